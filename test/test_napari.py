"""The napari plugin (fusemycells/napari/), headless: the widget on the bundled sample equals the command line's
output, cancel leaves no layer, a bad layer gets a message in the widget, the reader and the npe2 manifest.

Runs on Qt's offscreen platform (no display; set below before Qt starts) with napari's ``ViewerModel`` (the
viewer without its OpenGL canvas, which the offscreen platform cannot give: the widget needs only the layer
list). Skipped where napari or pytest-qt is not installed (requirements-napari.txt; CI installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("napari", reason="the napari plugin is optional: pip install -r requirements-napari.txt (CI does)")
pytest.importorskip("pytestqt", reason="pytest-qt drives the widget: pip install -r requirements-napari.txt (CI does)")

from conftest import blob_volume  # noqa: E402
from napari.components import ViewerModel  # noqa: E402

from fusemycells.backends import load_stage  # noqa: E402
from fusemycells.config import OUTPUT_SUBDIR  # noqa: E402
from fusemycells.io.tiff import read_volume  # noqa: E402
from fusemycells.napari.fusion import FusionEngine, coarse_grid_placement  # noqa: E402
from fusemycells.napari.reader import get_reader, read_stacks  # noqa: E402
from fusemycells.napari.widget import FuseWidget  # noqa: E402
from fusemycells.runtime.budget import BudgetPolicy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "test" / "input" / "images" / "fluorescence-lightsheet-3D-microscopy"
NUCLEUS = SAMPLE_DIR / "image_0_nucleus_angle.tif"
WAIT_MS = 300_000


def widget_on(viewer: ViewerModel, qtbot, engine: FusionEngine | None = None) -> FuseWidget:
    widget = FuseWidget(viewer, engine)
    qtbot.addWidget(widget.native)
    widget.device.value = "cpu"
    return widget


def fuse(widget: FuseWidget, qtbot) -> None:
    """Press Fuse and wait until the worker has finished."""
    qtbot.mouseClick(widget.run_button.native, qtbot_left())
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)


def qtbot_left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def test_widget_on_the_sample_equals_the_command_line_and_adds_a_named_layer_with_the_same_scale(qtbot, tmp_path: Path) -> None:
    folder = tmp_path / "in" / "images" / "fluorescence-lightsheet-3D-microscopy"
    folder.mkdir(parents=True)
    shutil.copy2(NUCLEUS, folder / NUCLEUS.name)
    cmd = [sys.executable, "inference.py", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
           "--device", "cpu", "--output-dtype", "float32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = read_volume(tmp_path / "out" / OUTPUT_SUBDIR / NUCLEUS.name).data

    viewer = ViewerModel()
    for data, kwargs, _ in read_stacks(str(NUCLEUS)):
        viewer.add_image(data, **kwargs)
    widget = widget_on(viewer, qtbot)
    assert widget.channel.value == "nucleus"
    fuse(widget, qtbot)
    assert widget.status.value.startswith("fused"), widget.status.value
    source, fused, weight = viewer.layers
    assert fused.name == "image_0_nucleus_angle fused (nucleus, FuseMyCells)"
    np.testing.assert_allclose(fused.scale, source.scale, rtol=0, atol=0)
    np.testing.assert_array_equal(fused.data, expected)
    assert "network weight" in weight.name and widget.progress.value == 100
    assert np.array_equal(source.data, read_volume(NUCLEUS).data)  # the layer's own pixels are not consumed


def test_the_weight_layer_shows_where_the_networks_acted_over_the_stacks_extent(qtbot, fixture_resources: Path) -> None:
    viewer = ViewerModel()
    spacing = (1.0, 0.39, 0.39)
    viewer.add_image(blob_volume(), name="blobs nucleus", scale=spacing)
    widget = widget_on(viewer, qtbot, FusionEngine(fixture_resources))
    fuse(widget, qtbot)
    assert "networks blended in" in widget.status.value, widget.status.value
    weight = viewer.layers[-1]
    assert weight.data.shape == (16, 16, 16) and weight.name == "blobs nucleus network weight 0-1"
    assert 0.0 < float(weight.data.max()) <= 1.0
    extent = np.array(blob_volume().shape) * spacing
    low = np.asarray(weight.translate) - np.asarray(weight.scale) / 2
    np.testing.assert_allclose(low, -np.asarray(spacing) / 2)  # both layers start at the first voxel's edge
    np.testing.assert_allclose(low + np.asarray(weight.scale) * 16, extent - np.asarray(spacing) / 2)


def test_cancel_during_loading_leaves_no_layer_and_the_widget_runs_again(qtbot, fixture_resources: Path) -> None:
    """Cancel pressed while the networks load (held there by the loader): no layer; then a second run works."""
    loading, release = threading.Event(), threading.Event()

    def held_loader(*args, **kwargs):
        loading.set()
        release.wait(60)
        return load_stage(*args, **kwargs)

    viewer = ViewerModel()
    viewer.add_image(blob_volume(), name="blobs", scale=(1.0, 0.39, 0.39))
    widget = widget_on(viewer, qtbot, FusionEngine(fixture_resources, loader=held_loader))
    qtbot.mouseClick(widget.run_button.native, qtbot_left())
    assert loading.wait(60)
    assert widget.cancel_button.enabled and not widget.run_button.enabled
    qtbot.mouseClick(widget.cancel_button.native, qtbot_left())
    release.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert [layer.name for layer in viewer.layers] == ["blobs"]
    assert widget.status.value == "cancelled: no layer added"
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    fuse(widget, qtbot)
    assert len(viewer.layers) == 3, widget.status.value


def test_cancel_during_the_patch_stage_stops_it_and_leaves_no_layer(qtbot, fixture_resources: Path, monkeypatch) -> None:
    """Cancel that arrives between two patch batches (set from the worker at the first batch's progress, so it
    cannot come too late) stops the sliding window: no layer, and the next run is whole. The pipeline never
    takes the cancel for a device fault (on a GPU it would rerun the step on the CPU instead of stopping)."""
    faults: list[str] = []
    original = BudgetPolicy.device_fault

    def recorded(self, step: str, exc: BaseException) -> bool:
        faults.append(f"{step}: {type(exc).__name__}")
        return original(self, step, exc)

    monkeypatch.setattr(BudgetPolicy, "device_fault", recorded)
    viewer = ViewerModel()
    viewer.add_image(blob_volume((24, 64, 64)), name="blobs", scale=(1.0, 0.39, 0.39))
    widget = widget_on(viewer, qtbot, FusionEngine(fixture_resources))
    seen: list[str] = []
    qtbot.mouseClick(widget.run_button.native, qtbot_left())
    listener = widget.listener
    report = listener.report

    def cancel_at_first_batch(text: str, fraction: float) -> None:
        seen.append(text)
        if text.startswith("patches"):
            listener.cancel.set()
        report(text, fraction)

    listener.report = cancel_at_first_batch
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    patches = [t for t in seen if t.startswith("patches")]
    assert len(patches) == 1 and not patches[0].startswith("patches 0/"), seen
    done, total = (int(n) for n in patches[0].split()[1].split("/"))
    assert done < total, seen  # stopped before the end of the patch stage
    assert [layer.name for layer in viewer.layers] == ["blobs"] and widget.status.value.startswith("cancelled")
    assert faults == []
    fuse(widget, qtbot)
    assert len(viewer.layers) == 3 and widget.status.value.startswith("fused"), widget.status.value


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (np.zeros((40, 40), np.uint16), {}, "this layer is 2D"),
        (np.zeros((2, 8, 40, 40), np.uint16), {}, "this layer is 4D"),
        (np.zeros((8, 40, 40), bool), {}, "pixel type bool"),
        (np.zeros((8, 40, 40, 3), np.uint8), {"rgb": True}, "an RGB layer"),
        (np.zeros((1, 40, 40), np.uint16), {}, "fewer than 2 voxels"),
    ],
)
def test_a_layer_that_cannot_be_fused_gets_a_message_in_the_widget_not_a_traceback(qtbot, data, kwargs, message) -> None:
    viewer = ViewerModel()
    viewer.add_image(data, name="bad", **kwargs)
    widget = widget_on(viewer, qtbot)
    qtbot.mouseClick(widget.run_button.native, qtbot_left())
    assert widget.worker is None and widget.status.value.startswith("cannot fuse:"), widget.status.value
    assert message in widget.status.value and len(viewer.layers) == 1


def test_a_failure_inside_the_fusion_is_shown_in_the_widget_and_adds_no_layer(qtbot, fixture_resources: Path) -> None:
    def broken_loader(*args, **kwargs):
        raise RuntimeError("weights file unreadable")

    viewer = ViewerModel()
    viewer.add_image(blob_volume(), name="blobs")
    widget = widget_on(viewer, qtbot, FusionEngine(fixture_resources, loader=broken_loader))
    fuse(widget, qtbot)
    assert widget.status.value == "fusion failed: weights file unreadable" and len(viewer.layers) == 1
    assert widget.run_button.enabled


def test_the_spacing_fields_take_the_layers_exact_scale_until_edited(qtbot) -> None:
    viewer = ViewerModel()
    viewer.add_image(blob_volume(), name="stack membrane", scale=(2.87460934, 0.29951895, 0.29951895))
    widget = widget_on(viewer, qtbot)
    assert [box.value for box in widget.spacing] == [2.8746, 0.2995, 0.2995]  # what the person sees
    assert widget.channel.value == "membrane"  # from the layer's name
    assert widget.request().spacing == (2.87460934, 0.29951895, 0.29951895)  # what the CLI would read
    widget.spacing[0].value = 3.0
    assert widget.request().spacing == (3.0, 0.29951895, 0.29951895)


def test_the_reader_opens_a_stack_with_its_spacing_as_scale_and_its_channel() -> None:
    assert get_reader(str(NUCLEUS)) is not None and get_reader("image.png") is None
    [(data, kwargs, kind)] = get_reader(str(NUCLEUS))(str(NUCLEUS))
    volume = read_volume(NUCLEUS)
    assert kind == "image" and data.shape == volume.data.shape
    assert tuple(kwargs["scale"]) == volume.spacing and kwargs["metadata"]["channel"] == "nucleus"


def write_stack(path: Path, data: np.ndarray, spacing: tuple[float, float, float], channel: str) -> None:
    """``data`` (ZYX) written at ``path`` by the registry's writer of the format its name says."""
    from fusemycells.io import formats
    from fusemycells.io.volume import Volume, WriteOptions

    planes = type("Planes", (), {"shape": data.shape, "dtype": data.dtype, "planes": lambda _, a, b: data[a:b]})()
    formats.named_like(path.name).write(path, planes, Volume(data, spacing, channel), WriteOptions())


@pytest.mark.parametrize("name", ["stack_membrane.mha", "stack_membrane.nii.gz", "stack_membrane.nrrd", "stack.ome.zarr"])
def test_the_reader_opens_every_registry_format_with_its_anisotropic_spacing_and_channel(tmp_path, name) -> None:
    if name.endswith(".zarr"):
        pytest.importorskip("zarr", reason="OME-Zarr is the [scale] extra")
    pytest.importorskip("SimpleITK", reason="the SimpleITK formats need SimpleITK")
    data = blob_volume((9, 40, 36))
    write_stack(tmp_path / name, data, (2.5, 0.3, 0.4), "membrane")
    reader = get_reader(str(tmp_path / name))
    assert reader is not None, name
    [(pixels, kwargs, kind)] = reader(str(tmp_path / name))
    np.testing.assert_array_equal(np.asarray(pixels), data)  # ZYX as written, not XYZ
    assert kind == "image" and tuple(kwargs["scale"]) == pytest.approx((2.5, 0.3, 0.4))
    assert kwargs["metadata"]["channel"] == "membrane" and kwargs["name"] == name.split(".")[0]


def test_a_mha_layer_fills_the_widgets_spacing_and_channel(tmp_path, qtbot) -> None:
    pytest.importorskip("SimpleITK", reason="the SimpleITK formats need SimpleITK")
    path = tmp_path / "view.mha"
    write_stack(path, blob_volume((6, 24, 24)), (2.0, 0.5, 0.5), "nucleus")
    viewer = ViewerModel()
    for data, kwargs, _ in get_reader(str(path))(str(path)):
        viewer.add_image(data, **kwargs)
    widget = widget_on(viewer, qtbot)
    assert widget.channel.value == "nucleus"  # from the file's metadata (the widget's default is membrane)
    assert widget.request().spacing == (2.0, 0.5, 0.5)


def test_the_manifests_reader_patterns_cover_every_format_the_fusion_reads() -> None:
    npe2 = pytest.importorskip("npe2")
    from fusemycells.io import formats

    manifest = npe2.PluginManifest.from_file(REPO / "fusemycells" / "napari" / "napari.yaml")
    [reader] = manifest.contributions.readers
    suffixes = {s for entry in formats.chosen() for s in entry.suffixes}
    assert {f"*{s}" for s in suffixes} <= set(reader.filename_patterns)
    assert reader.accepts_directories  # OME-Zarr images are folders
    assert get_reader(str(REPO / "README.md")) is None and get_reader(str(REPO / "test")) is None


def test_the_npe2_manifest_is_valid_and_its_commands_import() -> None:
    npe2 = pytest.importorskip("npe2")
    import importlib

    manifest = npe2.PluginManifest.from_file(REPO / "fusemycells" / "napari" / "napari.yaml")
    assert manifest.name == "fusemycells" and manifest.contributions.widgets and manifest.contributions.readers
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.python_name


def test_the_weight_map_placement_covers_the_stacks_extent() -> None:
    scale, translate = coarse_grid_placement((10, 40, 40), (2.0, 0.5, 0.5), (5, 8, 8))
    assert scale == (4.0, 2.5, 2.5) and translate == (1.0, 1.0, 1.0)
