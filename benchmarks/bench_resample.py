"""Side by side: the numpy/scipy oracle, the torch band products and SimpleITK on the pipeline's resampling and filter steps.

    python benchmarks/bench_resample.py [--depth 32] [--threads 2] [--json FILE]

Three steps on a slab of a 309×1920×1920 stack (``--depth`` planes of 1920², uint16, spacing 1.01/0.388 µm):
``to_h`` the resize onto the 0.6 µm grid H (mild shrink in Y/X, antialiased; growth in Z), ``to_coarse`` the
resize onto the 128³-voxel grid's spacing (strong shrink: the global and diff grids), ``output_filter`` the output
Gaussian (σ 0.35/0.9/0.9 voxels). Methods: ``oracle`` (the whole-volume numpy test oracle, ``test/reference.py``:
``scipy.ndimage.gaussian_filter`` and linear interpolation in float64, one thread; the reference of the differences,
not a pipeline path: the package's numpy streamed path is gone, issue #26), ``torch_band`` (the GPU's code path of :mod:`fusemycells.ops` run on the CPU's worker
threads), ``cpu_choice`` (what the pipeline runs on the CPU: per step the faster of the two), ``simpleitk``
(``DiscreteGaussian`` with the same σ and ``Resample`` with linear interpolation at aligned voxel centres, on
``--threads`` threads). Per method: wall and CPU seconds, peak RSS above the start of the step (``VmHWM``, reset
through /proc/self/clear_refs), max |difference| to the reference. Needs ``pip install -r
benchmarks/requirements.txt`` for SimpleITK (never in the image).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SPACING = (1.01, 0.388, 0.388)
OUTPUT_SIGMA = (0.35, 0.9, 0.9)


def reset_peak() -> float:
    """Reset this process's peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``); returns the current RSS (MiB)."""
    from fusemycells.runtime.devices import proc_status_mib

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return proc_status_mib("VmRSS") or 0.0


def measure(fn) -> tuple[np.ndarray, dict]:
    """Run ``fn()``; its result and wall / CPU seconds and peak RSS above the start (MiB)."""
    from fusemycells.runtime.devices import proc_status_mib

    start = reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    figures = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
               "peak_above_start_mib": round((proc_status_mib("VmHWM") or 0.0) - start, 1)}
    return out, figures


def sitk_resize(volume: np.ndarray, out_shape: tuple[int, ...], sigma: tuple[float, ...], threads: int) -> np.ndarray:
    """SimpleITK: DiscreteGaussian (variance σ², voxel units, zero-flux borders) then linear Resample onto
    ``out_shape`` with voxel centres aligned as in ``align_corners=False``."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    image = sitk.GetImageFromArray(volume)  # x, y, z order inside ITK
    if any(s > 0 for s in sigma):
        image = sitk.DiscreteGaussian(image, variance=[float(s) ** 2 for s in reversed(sigma)], maximumKernelWidth=64,
                                      maximumError=0.001, useImageSpacing=False)
    if tuple(out_shape) == volume.shape:
        return sitk.GetArrayFromImage(image)
    factors = [n / m for n, m in zip(volume.shape, out_shape)]
    spacing = [float(f) for f in reversed(factors)]
    origin = [0.5 * f - 0.5 for f in reversed(factors)]
    resampled = sitk.Resample(image, [int(n) for n in reversed(out_shape)], sitk.Transform(), sitk.sitkLinear, origin, spacing,
                              image.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32, help="planes of 1920² in the slab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from scipy import ndimage

    from fusemycells.config import PostprocessSpec
    from fusemycells.ops import Ops, antialias_sigma
    from fusemycells.preprocess import ResizedSource
    from fusemycells.sources import ArraySource, materialise, shape_for_spacing

    sys.path.insert(0, str(REPO / "test"))
    import reference as oracle  # the test oracle (whole-volume numpy)

    rng = np.random.default_rng(0)
    shape = (args.depth, 1920, 1920)
    raw = (ndimage.gaussian_filter(rng.random((shape[0], 240, 240), dtype=np.float32), 1.5)[:, np.repeat(np.arange(240), 8)][:, :, np.repeat(np.arange(240), 8)] * 4000
           + rng.normal(0, 20, shape).astype(np.float32)).clip(0, 65535).astype(np.uint16)
    x_in = ArraySource(raw, 100.0, 1 / 3000)
    normalised = x_in.planes(0, shape[0])
    grids = {"to_h": shape_for_spacing(shape, SPACING, (0.6,) * 3), "to_coarse": shape_for_spacing(shape, SPACING, (5.82, 5.82, 5.82))}
    band = Ops("cpu", cpu_hybrid=False, threads=args.threads)
    choice = Ops("cpu", threads=args.threads)
    spec = PostprocessSpec(output_sigma_knots=((0.0, OUTPUT_SIGMA[2]),), output_sigma_isotropic_um=False)
    rows = []
    for step in ("to_h", "to_coarse", "output_filter"):
        if step == "output_filter":
            blended = ArraySource(normalised)
            methods = {
                "oracle": lambda: ndimage.gaussian_filter(normalised, OUTPUT_SIGMA[2], mode="nearest"),
                "torch_band": lambda blended=blended: materialise(_filtered(blended, spec, band)),
                "cpu_choice": lambda blended=blended: materialise(_filtered(blended, spec, choice)),
                "simpleitk": lambda: sitk_resize(normalised, shape, (spec.output_sigma,) * 3, args.threads),
            }
        else:
            out_shape = grids[step]
            sigma = antialias_sigma(shape, out_shape)
            methods = {
                "oracle": lambda out_shape=out_shape: oracle.resize(normalised, out_shape),
                "torch_band": lambda out_shape=out_shape: materialise(ResizedSource(x_in, out_shape, cache=False, ops=band)),
                "cpu_choice": lambda out_shape=out_shape: materialise(ResizedSource(x_in, out_shape, cache=False, ops=choice)),
                "simpleitk": lambda out_shape=out_shape, sigma=sigma: sitk_resize(normalised, out_shape, sigma, args.threads),
            }
        reference = None
        for name, fn in methods.items():
            try:
                out, figures = measure(fn)
            except ImportError as exc:
                rows.append({"step": step, "method": name, "error": str(exc)})
                continue
            reference = out if reference is None else reference
            figures.update(step=step, method=name, shape=list(out.shape), max_abs_diff=float(np.abs(out - reference).max()))
            rows.append(figures)
            print(f"{step:14s} {name:11s} wall {figures['wall_s']:7.2f} s  CPU {figures['cpu_s']:7.2f} s  "
                  f"peak +{figures['peak_above_start_mib']:7.0f} MiB  max |diff| {figures['max_abs_diff']:.2e}", flush=True)
            del out
    if args.json is not None:
        args.json.write_text(json.dumps({"slab": list(shape), "threads": args.threads, "rows": rows}, indent=1))
    return 0


def _filtered(source, spec, ops):
    from fusemycells.postprocess import OutputSource

    return OutputSource(source, spec, None, ops)


if __name__ == "__main__":
    raise SystemExit(main())
