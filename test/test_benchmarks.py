"""The measurement tools in benchmarks/ (MONAI itself is not installed in CI: only our side runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_stages  # noqa: E402
import bench_stitching  # noqa: E402
import profile_memory  # noqa: E402

from fusemycells.runtime.devices import torch_threads  # noqa: E402
from fusemycells.stitching import sliding_window  # noqa: E402


def test_npy_planes_reads_each_channel_range_of_the_file(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((2, 6, 5, 7), dtype=np.float32)
    np.save(tmp_path / "x.npy", data)
    for channel in (0, 1):
        source = bench_stitching.NpyPlanes(tmp_path / "x.npy", channel)
        assert source.shape == (6, 5, 7)
        np.testing.assert_array_equal(source.planes(2, 5), data[channel, 2:5])
        np.testing.assert_array_equal(source.planes(0, 6), data[channel])


def test_our_benchmark_side_stitches_like_the_library_with_concurrent_workers(fixture_resources: Path, tmp_path: Path) -> None:
    import torch

    volume = bench_stitching.make_input((20, 36, 28))
    np.save(tmp_path / "input.npy", volume)
    model_path = fixture_resources / "fixture_stage2.pt"
    with torch_threads(torch.get_num_threads()):  # the worker sets torch's threads: restore them after
        result = bench_stitching.worker("ours", tmp_path / "input.npy", model_path, tmp_path / "ours.npy", 16, 0.5, 2, 2, 2)
    model = torch.jit.load(str(model_path)).eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    expected, stats = sliding_window([volume[0], volume[1]], predict, (16, 16, 16), overlap=0.5, batch_size=2)
    correction = np.load(tmp_path / "ours.npy")
    assert correction.dtype == np.float16
    np.testing.assert_allclose(correction.astype(np.float32) + volume[0], expected, atol=2e-3)
    assert result["patches"] == stats.patches and result["workers"] == 2
    assert result["wall_s"] > 0 and result["forward_s"] > 0 and result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0


def test_memory_sampler_sees_a_large_allocation_of_the_main_thread() -> None:
    sampler = profile_memory.Sampler(interval=0.01)
    start = profile_memory.rss_mib()
    sampler.start()
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    import time

    time.sleep(0.2)
    sampler.stop.set()
    sampler.join()
    assert block[-1] == 1.0
    assert sampler.peak >= start + 250
    assert sampler.by_function  # samples were attributed to a place


def test_window_positions_agree_with_monai_only_when_the_size_fits_the_step() -> None:
    assert bench_stitching.monai_starts(355, 64, 0.5)[-2:] == [288, 291]  # last window moved back
    assert not bench_stitching.same_windows([440, 653, 355], 64, 0.5)
    assert bench_stitching.same_windows([448, 640, 352], 64, 0.5)
    assert bench_stitching.same_windows([40, 64, 30], 64, 0.5)  # axes shorter than a patch: one window


def test_stage_benchmark_times_a_full_run_with_an_instant_network_and_profiles_it(tmp_path: Path) -> None:
    import json

    out = tmp_path / "stages.json"
    assert bench_stages.main(["--shape", "8", "64", "64", "--case-dir", str(tmp_path / "cases"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    best = result["best"]
    assert best["status"] == "ok" and best["degradation"] == 0 and result["shape"] == [8, 64, 64]
    assert {"read", "preprocess", "global_stage", "patch_stage", "postprocess", "write", "total"} <= set(best["seconds"])
    assert {"read_s", "resampling_s", "forward_s", "stitching_s", "blend_s", "write_s"} <= set(best["profile_s"])
    assert 0 < best["non_network_s"] < best["seconds"]["total"] and best["peak_rss_mib"] > 0 and best["cpu_s"] > 0
    assert (tmp_path / "cases" / "8x64x64").is_dir()  # the generated stack is kept for the next run
