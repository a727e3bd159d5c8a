"""Sliding-window inference and Gaussian stitching (fusemycells.stitching)."""

from __future__ import annotations

import numpy as np
import pytest

from fusemycells.ops import Ops
from fusemycells.preprocess import ResizedSource
from fusemycells.stitching import (
    axis_weight_sums,
    gaussian_importance,
    gaussian_profiles,
    pad_to_patch,
    sliding_window,
    window_starts,
)

PATCH = (8, 10, 12)


def pointwise(batch: np.ndarray) -> np.ndarray:
    """A per-voxel model of both input channels: stitching must reproduce it exactly."""
    return 2.0 * batch[:, :1] + batch[:, 1:2] ** 2


def two_channels(shape: tuple[int, int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)]


def whole_volume(channels: list[np.ndarray]) -> np.ndarray:
    return pointwise(np.stack(channels)[None])[0, 0]


@pytest.mark.parametrize(
    "shape",
    [
        (5, 7, 9),  # smaller than the patch in every axis
        (5, 23, 31),  # smaller in z only
        (19, 4, 30),  # smaller in y only
        (21, 23, 29),  # not divisible by the step anywhere
        (1, 17, 15),  # one slice
        PATCH,  # patch == volume
        (16, 20, 24),  # exact multiple of the step
    ],
)
def test_pointwise_model_stitched_equals_whole_volume(shape: tuple[int, int, int]) -> None:
    channels = two_channels(shape)
    out, stats = sliding_window(channels, pointwise, PATCH, overlap=0.5, batch_size=2)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, whole_volume(channels), atol=1e-5, rtol=0)
    assert stats.patches == int(np.prod(stats.grid))


def test_constant_model_output_is_one_everywhere_so_every_voxel_is_covered() -> None:
    channels = two_channels((21, 23, 29))

    def ones(batch: np.ndarray) -> np.ndarray:
        return np.ones((batch.shape[0], 1, *batch.shape[2:]), dtype=np.float32)

    out, _ = sliding_window(channels, ones, PATCH, overlap=0.25)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_patch_local_gaussian_model_output_has_no_nan() -> None:
    importance = gaussian_importance(PATCH)

    def bump(batch: np.ndarray) -> np.ndarray:
        return np.broadcast_to(importance, (batch.shape[0], 1, *PATCH)).astype(np.float32)

    out, _ = sliding_window(two_channels((21, 23, 29)), bump, PATCH, overlap=0.5)
    assert np.isfinite(out).all()
    assert out.min() > 0.0


@pytest.mark.parametrize(
    "length, patch, overlap", [(100, 16, 0.5), (17, 16, 0.5), (97, 32, 0.25), (50, 7, 0.0), (64, 16, 0.9)]
)
def test_window_starts_cover_the_axis_and_end_at_the_border(length: int, patch: int, overlap: float) -> None:
    starts = window_starts(length, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] + patch == length
    assert starts == sorted(set(starts))
    steps = np.diff(starts)
    assert steps.max() <= max(1, int(patch * (1 - overlap)))
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_window_starts_short_axis_is_one_window_and_bad_overlap_rejected() -> None:
    assert window_starts(5, 16, 0.5) == [0]
    assert window_starts(16, 16, 0.5) == [0]
    with pytest.raises(ValueError):
        window_starts(100, 16, 1.0)


def test_batch_size_does_not_change_the_result() -> None:
    channels = two_channels((21, 23, 29), seed=5)

    def nonlocal_model(batch: np.ndarray) -> np.ndarray:  # depends on the whole patch, so windows differ
        return batch[:, :1] * batch.mean(axis=(1, 2, 3, 4), keepdims=True)

    one, s1 = sliding_window(channels, nonlocal_model, PATCH, batch_size=1)
    three, s3 = sliding_window(channels, nonlocal_model, PATCH, batch_size=3)
    np.testing.assert_array_equal(one, three)
    assert s1.batches > s3.batches and s1.patches == s3.patches


def test_predict_never_gets_more_than_batch_size_patches() -> None:
    sizes: list[int] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        sizes.append(batch.shape[0])
        assert batch.shape[1:] == (2, *PATCH) and batch.dtype == np.float32
        return pointwise(batch)

    sliding_window(two_channels((21, 23, 29)), recording, PATCH, batch_size=3)
    assert max(sizes) == 3


@pytest.mark.parametrize("shape", [(21, 23, 29), (5, 7, 9)])
def test_emitted_planes_arrive_in_order_once_and_equal_the_whole_volume_result(shape: tuple[int, int, int]) -> None:
    channels = two_channels(shape, seed=7)
    out = np.full(shape, np.nan, dtype=np.float32)
    ranges: list[tuple[int, int]] = []

    def emit(z0: int, z1: int, planes: np.ndarray) -> None:
        ranges.append((z0, z1))
        out[z0:z1] = planes

    result, _ = sliding_window(channels, pointwise, PATCH, emit=emit)
    assert result is None
    assert ranges[0][0] == 0 and ranges[-1][1] == shape[0]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    np.testing.assert_allclose(out, whole_volume(channels), atol=1e-5, rtol=0)


def test_lazy_plane_sources_give_the_same_result_as_arrays() -> None:
    channels = two_channels((21, 23, 29), seed=3)
    lazy = [ResizedSource(c, c.shape, ops=Ops("cpu", threads=2)) for c in channels]  # same-shape resize: reads planes on demand
    expected, _ = sliding_window(channels, pointwise, PATCH)
    got, _ = sliding_window(lazy, pointwise, PATCH)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_after_batch_is_told_every_batch_up_to_the_total() -> None:
    calls: list[tuple[int, int]] = []
    _, stats = sliding_window(
        two_channels((21, 23, 29)), pointwise, PATCH, batch_size=4, after_batch=lambda d, t: calls.append((d, t))
    )
    assert len(calls) == stats.batches
    assert calls[-1] == (stats.patches, stats.patches) and stats.stopped is None


def test_a_reason_returned_after_a_batch_stops_the_run_and_is_reported() -> None:
    calls = [0]

    def counting(batch: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return pointwise(batch)

    emitted: list[int] = []
    _, stats = sliding_window(
        two_channels((16, 60, 60)), counting, PATCH, batch_size=1, workers=2,
        emit=lambda z0, z1, planes: emitted.append(z0), after_batch=lambda done, total: "too slow" if done >= 3 else None,
    )  # fmt: skip
    assert stats.stopped == "too slow" and stats.patches == 3
    assert calls[0] <= 3 + 2 and not emitted  # the batches in flight finish; no new ones start


def test_mismatched_channel_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        sliding_window([np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 9), np.float32)], pointwise, PATCH)


def test_gaussian_importance_peaks_at_one_in_the_centre_and_is_floored() -> None:
    w = gaussian_importance((9, 9, 9), floor=1e-3)
    assert w.max() == pytest.approx(1.0) and w[4, 4, 4] == pytest.approx(1.0)
    wide = gaussian_importance((64, 64, 64), floor=1e-3)  # σ 8: the raw Gaussian is 4e-4 at the edges
    assert wide.min() == pytest.approx(1e-9, rel=1e-3)  # floored per axis: corners get 1e-3³ > 0
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1])  # symmetric


def test_pad_to_patch_pads_only_short_axes_at_the_high_end() -> None:
    vol = np.arange(3 * 20 * 5, dtype=np.float32).reshape(3, 20, 5)
    padded = pad_to_patch(vol, (8, 10, 12))
    assert padded.shape == (8, 20, 12)
    np.testing.assert_array_equal(padded[:3, :, :5], vol)
    assert pad_to_patch(vol, (2, 2, 2)) is vol


def test_weight_sum_of_a_window_grid_is_the_outer_product_of_axis_sums() -> None:
    shape, patch = (21, 30, 17), (8, 12, 6)
    starts = [window_starts(n, p, 0.5) for n, p in zip(shape, patch)]
    importance = gaussian_importance(patch)
    brute = np.zeros(shape)
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                brute[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += importance
    sums = [axis_weight_sums(n, s, g) for n, s, g in zip(shape, starts, gaussian_profiles(patch))]
    np.testing.assert_allclose(sums[0][:, None, None] * sums[1][None, :, None] * sums[2][None, None, :], brute, rtol=1e-5)
    assert brute.min() > 0  # every voxel is covered


def patch_local_model(batch: np.ndarray) -> np.ndarray:
    """Depends on the whole patch (its mean), so the stitched sums differ per window: a wrong
    accumulation order or a lost batch would change the output."""
    return batch[:, :1] * batch[:, 1:2].mean(axis=(1, 2, 3, 4), keepdims=True) + batch[:, :1] ** 3


def test_concurrent_workers_give_bit_identical_output_despite_out_of_order_completion() -> None:
    import time

    channels = two_channels((21, 33, 29), seed=4)
    rng = np.random.default_rng(0)

    def jittery(batch: np.ndarray) -> np.ndarray:
        time.sleep(float(rng.random()) * 0.004)  # later batches often finish first
        return patch_local_model(batch)

    reference, _ = sliding_window(channels, patch_local_model, PATCH, overlap=0.5, batch_size=2)
    for workers in (2, 3):
        got, stats = sliding_window(channels, jittery, PATCH, overlap=0.5, batch_size=2, workers=workers)
        np.testing.assert_array_equal(got, reference)
        assert stats.patches == np.prod(stats.grid)


def test_workers_run_that_many_batches_at_once_and_never_more() -> None:
    import threading
    import time

    lock, running, peak = threading.Lock(), [0], [0]

    def slow(batch: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return pointwise(batch)

    channels = two_channels((8, 40, 40))
    for workers in (1, 3):
        peak[0] = 0
        got, _ = sliding_window(channels, slow, PATCH, overlap=0.5, batch_size=1, workers=workers)
        np.testing.assert_allclose(got, whole_volume(channels), rtol=1e-5, atol=1e-6)
        assert peak[0] == workers


def test_an_error_after_a_batch_stops_concurrent_workers_and_propagates() -> None:
    calls = [0]

    def counting(batch: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return pointwise(batch)

    def stop(done: int, total: int) -> None:
        if done >= 4:
            raise RuntimeError("deadline")

    with pytest.raises(RuntimeError, match="deadline"):
        sliding_window(two_channels((16, 60, 60)), counting, PATCH, overlap=0.5, batch_size=1, workers=2, after_batch=stop)
    assert calls[0] <= 4 + 2  # the batches in flight finish; no new ones start
