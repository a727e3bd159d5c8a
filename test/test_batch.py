"""Scale-out runs (fusemycells.batch): a 2-worker local dask cluster, resume, worker death, OME-Zarr, CLI.

The cluster tests share one 2-process cluster (about 5 s to start here) and the fixture networks.
They need the optional packages of requirements-scale.txt (CI installs them); the resume and
planning tests run without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import REPO, blob_volume, write_case
from report_check import assert_valid_report

from fusemycells import batch
from fusemycells.batch import SetupError, WorkerSettings, collect_inputs, plan_jobs, run_job, verify_complete
from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
from fusemycells.io import formats
from fusemycells.io.scan import unknown_reason
from fusemycells.io.tiff import read_volume

needs_scale = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("distributed", "zarr", "ome_zarr")),
    reason="optional scale-out packages missing: pip install -r requirements-scale.txt",
)

NOT_AN_INPUT = unknown_reason(formats.chosen())  # 'not a tiff/mha/.../ome-zarr input'
CASES = [  # (shape ZYX, seed, channel, spacing µm ZYX)
    ((12, 40, 36), 0, "nucleus", (1.0, 0.39, 0.39)),
    ((10, 48, 40), 1, "membrane", (2.0, 0.3, 0.3)),
    ((14, 36, 44), 2, "nucleus", (1.2, 0.5, 0.5)),
    ((12, 44, 40), 3, "membrane", (1.0, 0.39, 0.39)),
]


def make_inputs(folder: Path, cases: list = CASES) -> list[Path]:
    """Challenge-style TIFFs of blob volumes in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_case(folder, f"case_{i}_{c}.tif", blob_volume(shape, seed), spacing=sp, channel=c)
        for i, (shape, seed, c, sp) in enumerate(cases)
    ]


class StallOnce:
    """Test hook: the first attempt at file ``name`` writes its worker's pid to ``marker`` and stalls; later attempts run at once."""

    def __init__(self, name: str, marker: Path, seconds: float = 120.0) -> None:
        self.name, self.marker, self.seconds = name, marker, seconds

    def __call__(self, name: str) -> None:
        if name == self.name and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(self.seconds)


def wait_for_file(path: Path, timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and (text := path.read_text()):
            return text
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear in {timeout} s")


@pytest.fixture
def fuser(fixture_resources: Path) -> Iterator[Any]:
    """An in-process Fuser on the fixture networks (CPU, one thread), as a worker builds it."""
    yield batch._make_fuser(WorkerSettings(str(fixture_resources), device="cpu", threads=1))


@pytest.fixture(scope="module")
def client(fixture_resources: Path) -> Iterator[Any]:
    """A client of a 2-worker local cluster (processes) with the Fuser plugin on the fixture networks."""
    if any(importlib.util.find_spec(m) is None for m in ("distributed", "zarr", "ome_zarr")):
        pytest.skip("optional scale-out packages missing: pip install -r requirements-scale.txt")
    from distributed import Client

    cluster = batch.start_local_cluster(2, 1, [])
    dask_client = Client(cluster)
    dask_client.register_plugin(
        batch.FuserPlugin(WorkerSettings(str(fixture_resources), device="cpu", threads=1)), name=batch.PLUGIN_NAME
    )
    yield dask_client
    dask_client.close()
    cluster.close()


# --- without a cluster -------------------------------------------------------------------


def test_package_imports_without_the_optional_packages_and_batch_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "for name in ('dask', 'distributed', 'zarr', 'ome_zarr'): sys.modules[name] = None\n"
        "import fusemycells, fusemycells.pipeline, fusemycells.io.omezarr\n"
        "from fusemycells import batch\n"
        f"sys.exit(batch.main([{str(tmp_path)!r}, '--output', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr
    assert "pip install -r requirements-scale.txt" in proc.stderr


def test_inputs_are_tiffs_and_ome_zarr_images_and_outputs_keep_their_names(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    tif = make_inputs(folder, CASES[:1])[0]
    store = folder / "t0_membrane.ome.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"multiscales": [{"datasets": []}]}}})
    )
    (folder / "notes.txt").write_text("not an image")
    (folder / "plain.zarr").mkdir()  # a Zarr folder that is not an OME image
    found = collect_inputs([folder])
    assert found == [(tif.resolve(), "tiff"), (store.resolve(), "ome-zarr")]
    jobs = plan_jobs(found, tmp_path / "out", "auto")
    assert [(Path(j.output).name, j.output_format) for j in jobs] == [(tif.name, "tiff"), (store.name, "ome-zarr")]
    as_zarr = plan_jobs(found[:1], tmp_path / "out", "ome-zarr")
    as_tiff = plan_jobs(found[1:], tmp_path / "out", "tiff")
    assert (
        Path(as_zarr[0].output).name == "case_0_nucleus.ome.zarr" and Path(as_tiff[0].output).name == "t0_membrane.tif"
    )
    with pytest.raises(SetupError, match="both be written"):
        plan_jobs([found[0], (folder.parent / "other" / tif.name, "tiff")], tmp_path / "out")
    with pytest.raises(SetupError, match="not found"):
        collect_inputs([tmp_path / "missing"])


def test_a_retry_in_the_same_run_reports_the_written_file_as_written_not_skipped(fuser: Any, tmp_path: Path) -> None:
    # dask recomputes a finished task whose result died with its worker: the retry finds the output complete
    source = make_inputs(tmp_path / "in", CASES[:1])[0]
    job = replace(plan_jobs(collect_inputs([source]), tmp_path / "out")[0], run_token="run-a")
    first = run_job(job, fuser=fuser)
    retry = run_job(job, fuser=fuser)
    assert retry["status"] == "ok" and "recovered" in retry
    assert retry["pid"] == first["pid"] and retry["shape"] == first["shape"] and retry["seconds"] == first["seconds"]
    later_run = run_job(replace(job, run_token="run-b"), fuser=fuser)
    assert later_run["status"] == "skipped" and "recovered" not in later_run


def test_verified_outputs_are_skipped_and_anything_else_is_redone(fuser: Any, tmp_path: Path) -> None:
    source = make_inputs(tmp_path / "in", CASES[:1])[0]
    job = plan_jobs(collect_inputs([source]), tmp_path / "out", fingerprint={"weights": "w1"})[0]
    output = Path(job.output)
    assert verify_complete(job) == (False, "no completion record")
    first = run_job(job, fuser=fuser)
    assert first["status"] == "ok" and batch.record_path(output).is_file()
    written = output.read_bytes()
    assert run_job(job, fuser=fuser)["status"] == "skipped"
    # same size, one byte changed: the checksum catches it, and the file is fused again
    corrupt = bytearray(written)
    corrupt[len(corrupt) // 2] ^= 0xFF
    output.write_bytes(bytes(corrupt))
    assert verify_complete(job) == (False, "output checksum differs from its record")
    assert run_job(job, fuser=fuser)["status"] == "ok"
    assert output.read_bytes() == written
    # a truncated output, other weights, a changed input, a lost record: not complete
    assert verify_complete(replace(job, fingerprint={"weights": "w2"})) == (
        False,
        "made with other settings or weights",
    )
    output.write_bytes(written[:-10])
    assert verify_complete(job)[1] == "output size differs from its record"
    output.write_bytes(written)
    assert verify_complete(job)[0]
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert verify_complete(job) == (False, "input changed since")
    batch.record_path(output).unlink()
    assert verify_complete(job) == (False, "no completion record")


def test_a_bad_file_is_refused_without_a_record(fuser: Any, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.tif"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tiff at all")
    job = plan_jobs(collect_inputs([bad]), tmp_path / "out")[0]
    entry = run_job(job, fuser=fuser)
    assert entry["status"] == "refused" and "not a readable TIFF" in entry["error"]
    assert not batch.record_path(Path(job.output)).exists()


def test_channel_flag_overrides_the_file_metadata(fuser: Any, tmp_path: Path) -> None:
    source = make_inputs(tmp_path / "in", CASES[:1])[0]  # a nucleus stack
    job = plan_jobs(collect_inputs([source]), tmp_path / "out", channel="membrane")[0]
    entry = run_job(job, fuser=fuser)
    assert entry["status"] == "ok" and entry["channel"] == "membrane"
    assert read_volume(Path(job.output)).channel == "membrane"


@needs_scale
def test_setup_errors_exit_2_before_any_cluster_starts(fixture_resources: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    assert batch.main([str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--report", str(report)]) == 2
    assert "input not found" in json.loads(report.read_text())["error"]
    make_inputs(tmp_path / "in", CASES[:1])
    empty = tmp_path / "no-weights"
    empty.mkdir()
    assert (
        batch.main(
            [
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--resources",
                str(empty),
                "--report",
                str(report),
            ]
        )
        == 2
    )
    assert "manifest" in json.loads(report.read_text())["error"]
    assert batch.main([str(tmp_path / "empty-folder-missing"), "--output", str(tmp_path / "out")]) == 2


# --- on a 2-worker local cluster ---------------------------------------------------------


@needs_scale
def test_two_workers_write_what_inference_writes_file_by_file(
    client: Any, fixture_resources: Path, tmp_path: Path
) -> None:
    root = tmp_path / "gc"
    inputs = make_inputs(root / INPUT_SUBDIR)
    cmd = [
        sys.executable,
        str(REPO / "inference.py"),
        "--input",
        str(root),
        "--output",
        str(root),
        "--resources",
        str(fixture_resources),
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO)
    )
    assert proc.returncode == 0, proc.stderr
    jobs = plan_jobs(collect_inputs([root / INPUT_SUBDIR]), tmp_path / "out", fingerprint={"weights": "fixture"})
    entries = batch.run_batch(client, jobs)
    assert [e["status"] for e in entries] == ["ok"] * len(CASES)
    assert [e["file"] for e in entries] == [p.name for p in inputs]  # input order, whatever finished first
    assert len({e["pid"] for e in entries}) == 2  # both workers took files
    for path in inputs:
        ours, theirs = tmp_path / "out" / path.name, root / OUTPUT_SUBDIR / path.name
        np.testing.assert_array_equal(tifffile.imread(ours), tifffile.imread(theirs))
        a, b = read_volume(ours), read_volume(theirs)
        assert (a.spacing, a.channel) == (b.spacing, b.channel)


@needs_scale
def test_a_file_whose_worker_is_killed_is_finished_by_another_worker(client: Any, tmp_path: Path) -> None:
    make_inputs(tmp_path / "in")
    jobs = plan_jobs(collect_inputs([tmp_path / "in"]), tmp_path / "out")
    marker = tmp_path / "stalled.pid"
    lost_before = batch.workers_lost(client)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(batch.run_batch, client, jobs, StallOnce(jobs[1].name, marker))
        killed = int(wait_for_file(marker))
        os.kill(killed, signal.SIGKILL)  # a worker process of this test's cluster, mid-file
        entries = running.result(timeout=120)
    assert [e["status"] for e in entries] == ["ok"] * len(jobs)
    assert entries[1]["pid"] != killed
    assert [e["retries"] for e in entries] == [0, 1, 0, 0]  # the killed attempt is counted on its file
    assert batch.workers_lost(client) - lost_before == 1  # and the run counts the worker it lost
    assert all(verify_complete(job)[0] for job in jobs)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


@needs_scale
def test_cli_gathers_one_report_refuses_a_bad_file_and_resumes(
    client: Any, fixture_resources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "in"
    make_inputs(folder, CASES[:2])
    (folder / "broken.tif").write_bytes(b"not a tiff")
    (folder / "notes.txt").write_text("not an image")
    out, report = tmp_path / "out", tmp_path / "report.json"
    argv = [
        str(folder),
        "--output",
        str(out),
        "--scheduler",
        client.scheduler.address,
        "--resources",
        str(fixture_resources),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--report",
        str(report),
    ]
    with caplog.at_level("INFO", logger="fusemycells"):
        assert batch.main(argv) == 1
    data = json.loads(report.read_text())
    assert_valid_report(data)  # every key documented in fusemycells/report.schema.json
    assert data["ignored"] == [{"file": str((folder / "notes.txt").resolve()), "reason": NOT_AN_INPUT}]
    assert "skipped " + repr(str((folder / "notes.txt").resolve())) + ": " + NOT_AN_INPUT in caplog.text
    assert data["cluster"]["workers_lost"] == 0 and all(e["retries"] == 0 for e in data["files"])
    assert data["refused"] == ["broken.tif"] and data["written"] == 2 and data["cluster"]["workers"] == 2
    assert data["counts"] == {"inputs": 3, "written": 2, "refused": 1, "skipped": 0} and data["exit_code"] == 1
    by_name = {e["file"]: e for e in data["files"]}
    assert "not a readable TIFF" in by_name["broken.tif"]["error"]
    assert all(
        by_name[n]["worker"] and by_name[n]["seconds"]["total"] > 0
        for n in ("case_0_nucleus.tif", "case_1_membrane.tif")
    )
    (folder / "broken.tif").unlink()
    assert batch.main(argv) == 0
    resumed = json.loads(report.read_text())
    assert_valid_report(resumed)
    assert resumed["skipped"] == 2 and resumed["counts"]["skipped"] == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="fusemycells"):
        assert batch.main([*argv, "--overwrite"]) == 0  # outputs replaced, as asked: one line says so per file
    replaced = [r.getMessage() for r in caplog.records if "replaced the existing output" in r.getMessage()]
    assert len(replaced) == 2 and all(r.levelname == "INFO" for r in caplog.records if "replaced the" in r.getMessage())
    assert all(e["replaced"] for e in json.loads(report.read_text())["files"])


@needs_scale
def test_ome_zarr_in_and_out_keeps_spacing_and_fuses_like_the_tiff(
    client: Any, fixture_resources: Path, tmp_path: Path
) -> None:
    import zarr
    from ome_zarr.writer import write_image

    data = blob_volume((12, 40, 36), seed=7)
    spacing = (1.5, 0.4, 0.4)
    tif = write_case(tmp_path / "tif", "embryo_nucleus.tif", data, spacing=spacing, channel="nucleus")
    store = tmp_path / "zarr" / "embryo_nucleus.ome.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    write_image(
        data,
        group,
        scale_factors=[2],
        axes="zyx",
        scale=dict(zip("zyx", spacing)),
        axes_units=dict.fromkeys("zyx", "micrometer"),
    )
    out = tmp_path / "out"
    argv = [
        str(tif),
        str(store),
        "--output",
        str(out),
        "--scheduler",
        client.scheduler.address,
        "--resources",
        str(fixture_resources),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--zarr-levels",
        "2",
    ]
    assert batch.main(argv) == 0
    from fusemycells.io import omezarr

    level0 = omezarr.open_level(out / store.name, 0)
    assert level0.shape == data.shape and level0.spacing == pytest.approx(spacing) and level0.channel == "nucleus"
    assert omezarr.open_level(out / store.name, 1).shape == (12, 20, 18)
    np.testing.assert_array_equal(omezarr.read_level(level0), tifffile.imread(out / tif.name))
    assert verify_complete(plan_jobs(collect_inputs([store]), out, fingerprint=_fingerprint(out / store.name))[0])[0]


def _fingerprint(output: Path) -> dict[str, Any]:
    return json.loads(batch.record_path(output).read_text())["fingerprint"]


def test_the_image_gets_none_of_the_scale_out_packages() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    image_requirements = (REPO / "requirements.txt").read_text().lower()
    assert "requirements-scale" not in dockerfile
    assert not any(name in image_requirements for name in ("dask", "distributed", "zarr"))


# --- issue 27: the scale-out path keeps inference.py's promises ----------------------------------


def _md5s(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _zarr_store(path: Path, data: np.ndarray, axes: str = "zyx", omero: dict | None = None) -> Path:
    """An OME-Zarr image (NGFF 0.5) of ``data`` with the given axes, written by ome-zarr."""
    import zarr
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    spatial = {"z": 1.5, "y": 0.4, "x": 0.4}
    units = {a: "micrometer" for a in axes if a in spatial}
    scale = {a: spatial.get(a, 1.0) for a in axes}
    write_image(data, group, scale_factors=[], axes=axes, scale=scale, axes_units=units)
    if omero:
        group.attrs["ome"] = {**group.attrs["ome"], **omero}
    return path


@needs_scale
@pytest.mark.parametrize("where", ["the_input_folder", "inside_the_input_folder", "inside_a_zarr_store", "next_to_an_input_file"])
def test_an_output_folder_that_would_overwrite_inputs_is_refused_before_any_work(fixture_resources: Path, tmp_path: Path, where: str) -> None:
    folder = tmp_path / "in"
    tif = make_inputs(folder, CASES[:1])[0]
    store = _zarr_store(folder / "embryo_nucleus.ome.zarr", blob_volume((4, 16, 16)))
    inputs, output = {
        "the_input_folder": ([folder], folder),
        "inside_the_input_folder": ([folder], folder / "fused"),
        "inside_a_zarr_store": ([store], store / "fused"),
        "next_to_an_input_file": ([tif], folder),
    }[where]
    before = _md5s(folder)
    report = tmp_path / "report.json"
    argv = [*map(str, inputs), "--output", str(output), "--resources", str(fixture_resources), "--report", str(report)]
    assert batch.main(argv) == 2
    assert _md5s(folder) == before  # nothing written, nothing replaced
    error = json.loads(report.read_text())["error"]
    assert "would overwrite" in error or "inside" in error, error
    assert str(output.resolve()) in error


@pytest.mark.parametrize("garbage", ["[1, 2]", "null", '"text"', "OUTPUT_NULL", "INPUT_LIST", "FINGERPRINT_STRING"])
def test_a_completion_record_of_the_wrong_shape_is_ignored_with_a_warning_and_the_file_redone(
    fuser: Any, tmp_path: Path, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_inputs(tmp_path / "in", CASES[:1])[0]
    job = plan_jobs(collect_inputs([source]), tmp_path / "out")[0]
    assert run_job(job, fuser=fuser)["status"] == "ok"
    path = batch.record_path(Path(job.output))
    record = json.loads(path.read_text())
    spoilt = {"OUTPUT_NULL": {**record, "output": None}, "INPUT_LIST": {**record, "input": [1]}, "FINGERPRINT_STRING": {**record, "fingerprint": "x"}}
    path.write_text(json.dumps(spoilt[garbage]) if garbage in spoilt else garbage)
    with caplog.at_level("WARNING", logger="fusemycells"):
        entry = run_job(job, fuser=fuser)
    assert entry["status"] == "ok" and "recovered" not in entry  # fused and written again
    assert any(r.levelname == "WARNING" and "completion record" in r.getMessage() for r in caplog.records), caplog.text
    assert verify_complete(job)[0]  # a fresh record


@needs_scale
@pytest.mark.parametrize("where", ["a_folder", "under_a_file"])
def test_an_unwritable_report_path_is_refused_before_any_work(fixture_resources: Path, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture) -> None:
    make_inputs(tmp_path / "in", CASES[:1])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file cannot hold a report folder")
    report = tmp_path if where == "a_folder" else blocker / "report.json"
    out = tmp_path / "out"
    started = time.perf_counter()
    code = batch.main([str(tmp_path / "in"), "--output", str(out), "--resources", str(fixture_resources), "--workers", "1", "--report", str(report)])
    assert code == 2
    assert "--report" in caplog.text
    assert not out.exists() and time.perf_counter() - started < 5  # no cluster, no file fused


def test_entries_that_are_not_inputs_are_listed_with_their_reason(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    tif = make_inputs(folder, CASES[:1])[0]
    (folder / "notes.txt").write_text("not an image")
    (folder / "plain.zarr").mkdir()
    (folder / "plain.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (folder / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    ignored: list[dict[str, str]] = []
    assert collect_inputs([folder], ignored) == [(tif.resolve(), "tiff")]
    reasons = {Path(e["file"]).name: e["reason"] for e in ignored}
    assert reasons == {
        "gone.tif": "dangling symbolic link",
        "notes.txt": NOT_AN_INPUT,
        "plain.zarr": "a Zarr store without OME multiscales metadata",
    }


@needs_scale
def test_a_zarr_store_without_multiscales_named_as_input_says_so(tmp_path: Path) -> None:
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(SetupError, match="plain.zarr is a Zarr store without OME multiscales metadata"):
        collect_inputs([plain])


@needs_scale
def test_a_2d_zarr_image_is_written_with_a_warning_naming_the_spacing_used(fuser: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _zarr_store(tmp_path / "plane_nucleus.ome.zarr", blob_volume((1, 40, 36))[0], axes="yx")
    job = plan_jobs(collect_inputs([store]), tmp_path / "out")[0]
    with caplog.at_level("WARNING", logger="fusemycells"):
        entry = run_job(job, fuser=fuser)
    assert entry["status"] == "ok" and entry["shape"] == [1, 40, 36]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no z axis" in m and "1 µm" in m for m in warned), warned


@needs_scale
def test_one_channel_of_a_multichannel_zarr_image_is_fused_with_channel_index(fuser: Any, tmp_path: Path) -> None:
    from fusemycells.io import omezarr

    nuclei, membranes = blob_volume((12, 40, 36), seed=1), blob_volume((12, 40, 36), seed=2)
    omero = {"omero": {"channels": [{"label": "nuclei"}, {"label": "membranes"}]}}
    store = _zarr_store(tmp_path / "two.ome.zarr", np.stack([nuclei, membranes]), axes="czyx", omero=omero)
    plain = _zarr_store(tmp_path / "one" / "two.ome.zarr", membranes, axes="zyx", omero={"omero": {"channels": [{"label": "membranes"}]}})
    refused = run_job(plan_jobs(collect_inputs([store]), tmp_path / "none")[0], fuser=fuser)
    assert refused["status"] == "refused" and "--channel-index" in refused["error"]
    picked = run_job(plan_jobs(collect_inputs([store]), tmp_path / "picked", channel_index=1)[0], fuser=fuser)
    single = run_job(plan_jobs(collect_inputs([plain]), tmp_path / "single")[0], fuser=fuser)
    assert picked["status"] == single["status"] == "ok" and picked["channel"] == "membrane"
    a = omezarr.read_level(omezarr.open_level(tmp_path / "picked" / store.name))
    b = omezarr.read_level(omezarr.open_level(tmp_path / "single" / store.name))
    np.testing.assert_array_equal(a, b)  # channel 1 fused exactly as the same stack stored alone
    assert batch.parse_args(["x", "--output", "y", "--channel-index", "1"]).channel_index == 1


def test_a_worker_without_torch_says_to_install_requirements_txt_first(fixture_resources: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    plugin = batch.FuserPlugin(WorkerSettings(str(fixture_resources), device="cpu", threads=1))

    class FakeWorker:
        name = "w0"

    with pytest.raises(ImportError, match="torch is missing: install requirements.txt first"):
        plugin.setup(FakeWorker())


def test_the_batch_command_without_torch_exits_2_saying_what_to_install(tmp_path: Path) -> None:
    make_inputs(tmp_path / "in", CASES[:1])
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from fusemycells import batch\n"
        f"sys.exit(batch.main([{str(tmp_path / 'in')!r}, '--output', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "torch is missing: install requirements.txt first" in proc.stderr and "Traceback" not in proc.stderr


def test_bokeh_is_pinned_in_the_scale_extra_at_a_version_dask_accepts() -> None:
    from packaging.requirements import Requirement

    lines = (REPO / "requirements-scale.txt").read_text().splitlines()
    [pin] = [Requirement(line) for line in lines if line.startswith("bokeh")]
    [version] = [s.version for s in pin.specifier]
    if importlib.util.find_spec("distributed") is not None:
        from distributed.versions import BOKEH_REQUIREMENT

        assert BOKEH_REQUIREMENT.specifier.contains(version), (BOKEH_REQUIREMENT, version)


BATCH_SCRIPT = """
import sys
sys.path.insert(0, {test_dir!r})
from batch_hooks import StallInWrite
from fusemycells import batch
sys.exit(batch.main({argv!r}, before_file=StallInWrite({name!r}, {marker!r})))
"""


@needs_scale
@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_a_stopped_batch_removes_its_partials_and_reports_what_was_finished(
    fixture_resources: Path, tmp_path: Path, how: str
) -> None:
    folder = tmp_path / "in"
    write_case(folder, "a_first.tif", blob_volume((12, 48, 48), seed=1))  # larger: submitted first
    write_case(folder, "b_stalls.tif", blob_volume((24, 24, 24), seed=2))
    out, report_path, marker = tmp_path / "out", tmp_path / "report.json", tmp_path / "stalled.pid"
    out.mkdir()
    stale = out / ".fmc-earlier.partial"
    stale.write_bytes(b"half a TIFF of a killed earlier run")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    argv = [str(folder), "--output", str(out), "--resources", str(fixture_resources), "--workers", "1", "--threads", "1",
            "--device", "cpu", "--report", str(report_path)]
    script = BATCH_SCRIPT.format(test_dir=str(REPO / "test"), argv=argv, name="b_stalls.tif", marker=str(marker))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO), start_new_session=True)
    assert proc.stderr is not None
    try:
        wait_for_file(marker, timeout=120)
        assert any(p.name.startswith(".fmc-") and p != stale for p in out.iterdir())  # a write in progress
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)  # as a job runner stops it
        else:
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
        code = proc.wait(timeout=120)
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    expected = 143 if how == "sigterm" else 130
    assert code == expected, log[-3000:]
    assert "Traceback" not in log and "leaked" not in log, log[-3000:]
    stopped = [line for line in log.splitlines() if "stopping" in line]
    assert len(stopped) == 1 and "1 output(s) written" in stopped[0], log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_first.tif", "a_first.tif.done.json"]  # no partial left
    report = json.loads(report_path.read_text())
    assert_valid_report(report)
    assert report["exit_code"] == expected and report["terminated"] is (how == "sigterm") and report["interrupted"] is (how == "ctrl_c")
    assert [(e["file"], e["status"]) for e in report["files"]] == [("a_first.tif", "ok")]
    assert report["stale_partials_removed"] == [".fmc-earlier.partial"]


@needs_scale
def test_the_dashboard_link_is_printed_at_start_and_serves_the_status_page(fixture_resources: Path, tmp_path: Path) -> None:
    import re
    import urllib.request

    folder = tmp_path / "in"
    write_case(folder, "b_stalls.tif", blob_volume((24, 24, 24), seed=2))
    marker = tmp_path / "stalled.pid"
    argv = [str(folder), "--output", str(tmp_path / "out"), "--resources", str(fixture_resources), "--workers", "1",
            "--threads", "1", "--device", "cpu", "--dashboard", "127.0.0.1:0"]
    script = BATCH_SCRIPT.format(test_dir=str(REPO / "test"), argv=argv, name="b_stalls.tif", marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)
    assert proc.stderr is not None
    try:
        link = None
        for line in proc.stderr:
            if (found := re.search(r"dashboard at (http://\S+)", line)) is not None:
                link = found.group(1)
                break
        assert link is not None
        wait_for_file(marker, timeout=120)  # the run is under way: the page shows it
        with urllib.request.urlopen(link, timeout=30) as page:
            assert page.status == 200 and b"Dask needs bokeh" not in page.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
