"""Screenshot of the napari plugin on the bundled sample: the widget docked, the sample fused with it.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_screenshot.py --out docs/images/napari_widget.png

Needs napari with PyQt5 (requirements-napari.txt) and a display with OpenGL: napari draws its canvas with
OpenGL, which Qt's offscreen platform does not give, so this runs under Xvfb (Mesa's software OpenGL) on the
``xcb`` platform (system packages: docs/napari.md). Opens the sample stack with the plugin's reader (spacing as
the layer's scale), presses Fuse on the CPU, waits, shows input, fused output and weight map side by side
(napari's grid) at the middle plane, and saves the window as an 8-bit palette PNG (< 300 kB).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "test" / "input" / "images" / "fluorescence-lightsheet-3D-microscopy" / "image_1_membrane_angle.tif"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "napari_widget.png")
    parser.add_argument("--stack", type=Path, default=SAMPLE, help="a TIFF stack (default: the membrane sample)")
    parser.add_argument("--size", type=int, nargs=2, default=(1500, 860), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    # napari 0.9 warns (a notification over the canvas) that its PyQt5 support is deprecated: not ours to show;
    # the setting that hides it goes to a throw-away settings file, not the user's
    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp()) / "settings.yaml")

    import napari
    from napari.settings import get_settings
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from fusemycells.napari.reader import read_stacks
    from fusemycells.napari.widget import FuseWidget

    get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(title="FuseMyCells napari plugin", show=True)
    for data, kwargs, _ in read_stacks(str(args.stack)):
        viewer.add_image(data, **kwargs)
    widget = FuseWidget(viewer)
    widget.device.value = "cpu"
    widget.native.setMaximumWidth(480)
    widget.status.native.setWordWrap(True)
    viewer.window.add_dock_widget(widget, name="Fuse view (FuseMyCells)", area="right")
    viewer.window._qt_window.resize(*args.size)
    widget.start()
    app = QApplication.instance()
    started = time.perf_counter()
    while widget.worker is not None and time.perf_counter() - started < 600:
        app.processEvents()
        time.sleep(0.05)
    print(widget.status.value)
    viewer.grid.enabled = True
    # input | fused above, the weight map (black: 0 where the networks did not act) below
    viewer.dims.set_point(0, viewer.dims.range[0].stop / 2)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(shot[..., :3]).quantize(colors=256).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} kB, {shot.shape[1]}x{shot.shape[0]}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
