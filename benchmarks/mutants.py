"""Mutation check: plant single-point bugs in the package, one at a time, and see whether the tests notice.

Each :class:`Mutant` names a file, an exact snippet of it (which must occur exactly once: a snippet that
no longer matches means the code moved on and the list needs updating; the script then stops with exit
status 2 before running anything), its mutated form, and the tests that should catch it. The mutants are
planted in a temporary copy of the working tree (the files git tracks or would track, uncommitted changes
included), never in the tree itself; each is reverted before the next.

    python benchmarks/mutants.py              # all mutants: killed / survived, and a summary (~10 min on 2 cores)
    python benchmarks/mutants.py --only stitching-uniform-weights gate-ignored-in-blend
    python benchmarks/mutants.py --check      # only that every snippet still matches exactly once (seconds)
    python benchmarks/mutants.py --list

A mutant is *killed* when its tests fail (pytest exit status 1), or error out while collecting (reported
as such), or run past ``--timeout``; it *survives* when they pass. Before the mutants, the union of their
tests runs on the unmutated copy and must pass. Exit status: 0 when the kill rate reaches ``--min-rate``
(default 0.9), 1 below it, 2 on drift, 3 when the unmutated tests fail. Results and kill rate: docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``original`` (exactly once in ``file``) replaced by ``mutated``; ``tests`` are pytest
    arguments (files, node ids, ``-k`` expressions) run from the repository root."""

    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    breaks: str  # what goes wrong in a real run


COMPOSED = "test/test_composed_output.py"

MUTANTS: tuple[Mutant, ...] = (
    # --- the four bugs the audit of issue #30 found surviving ---
    Mutant(
        "stitching-uniform-weights", "fusemycells/stitching.py",
        "gz, gy, gx = gaussian_profiles(patch, sigma_scale)",
        "gz, gy, gx = (np.ones(n) for n in patch)",
        (COMPOSED, "test/test_stitching.py"), "patches averaged with equal weights: seams, edge artefacts",
    ),
    Mutant(
        "gate-ignored-in-blend", "fusemycells/pipeline.py",
        "gate = decision.factor if decision.region is None else decision.factor * decision.region",
        "gate = 1.0",
        (COMPOSED, "test/test_trust.py"), "the noise gate and the trust factor are computed but not applied",
    ),
    Mutant(
        "background-mask-dropped", "fusemycells/postprocess.py",
        "    weight *= background_mask(normalised_input, spec, ops=ops)\n",
        "",
        (COMPOSED, "test/test_postprocess.py"), "the networks' offset reaches empty space (SSIM's luminance term)",
    ),
    Mutant(
        "watcher-never-stops", "fusemycells/runtime/ladder.py",
        "if done < total and not patches_fit(total - done, rate, self._countdown):",
        "if done > total and not patches_fit(total - done, rate, self._countdown):",
        ("test/test_deadline.py", f"{COMPOSED}::test_a_slow_patch_network_is_stopped_mid_run_and_the_file_finishes_in_time_at_level_1"),
        "a slow patch network overruns the time budget (no output for the case)",
    ),
    # --- the I/O contract ---
    Mutant(
        "spacing-z-written-as-x", "fusemycells/io/tiff.py",
        '"PhysicalSizeZ": float(z),',
        '"PhysicalSizeZ": float(x),',
        ("test/test_io.py",), "the output declares the wrong Z spacing",
    ),
    Mutant(
        "output-dtype-forced-float32", "fusemycells/io/tiff.py",
        'dtype = np.dtype(getattr(data, "dtype", np.float32))',
        "dtype = np.dtype(np.float32)",
        ("test/test_io.py", "test/test_inference_cli.py"), "a uint16 output is written as float32",
    ),
    Mutant(
        "sha256-not-checked", "fusemycells/config.py",
        "if actual != weights.sha256:",
        "if False:",
        ("test/test_backends.py",), "corrupt or swapped weights load silently",
    ),
    Mutant(
        "input-metadata-dropped", "fusemycells/io/tiff.py",
        "            meta[str(key)] = value\n",
        "            pass\n",
        ("test/test_io.py",), "the input's metadata is not carried to the output",
    ),
    Mutant(
        "ssim-constant-c2", "fusemycells/evaluation/metrics.py",
        "c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2",
        "c1, c2 = (0.01 * data_range) ** 2, (0.02 * data_range) ** 2",
        ("test/test_metrics.py",), "the scores differ from the challenge's SSIM",
    ),
    Mutant(
        "percentiles-high-shifted", "fusemycells/preprocess.py",
        "lo, hi = np.percentile(flat, [low, high])",
        "lo, hi = np.percentile(flat, [low, high - 1.0])",
        ("test/test_preprocess.py", "test/test_reference.py"), "every normalisation uses the wrong upper percentile",
    ),
    Mutant(
        "antialias-sigma-halved", "fusemycells/ops.py",
        "math.sqrt(factor**2 - 1.0) / 2.0 if factor > 1.0",
        "math.sqrt(factor**2 - 1.0) / 4.0 if factor > 1.0",
        ("test/test_preprocess.py", "test/test_ops.py"), "downsampling aliases",
    ),
    Mutant(
        "window-sums-unweighted", "fusemycells/stitching.py",
        "        total[s : s + n] += profile\n",
        "        total[s : s + n] += 1.0\n",
        ("test/test_stitching.py",), "the stitched prediction is divided by the wrong weight sum",
    ),
    Mutant(
        "output-percentiles-swapped", "fusemycells/postprocess.py",
        "    with ops.section(\"percentile_normalisation_s\"):\n        low, high = spec.output_percentiles",
        "    with ops.section(\"percentile_normalisation_s\"):\n        high, low = spec.output_percentiles",
        ("test/test_reference.py", "test/test_ops.py"), "the output comes out inverted",
    ),
    # --- more of the composition ---
    Mutant(
        "stitching-overlap-halved", "fusemycells/stitching.py",
        "step = max(1, int(patch * (1.0 - overlap)))",
        "step = max(1, int(patch * (1.0 - overlap / 2)))",
        ("test/test_stitching.py", COMPOSED), "fewer, less overlapping patches: seams",
    ),
    Mutant(
        "stitching-sigma-doubled", "fusemycells/stitching.py",
        "    sigma_scale: float = 1.0 / 8.0,\n    emit",
        "    sigma_scale: float = 1.0 / 4.0,\n    emit",
        (COMPOSED,), "a flatter stitching Gaussian: patch borders weigh more",
    ),
    Mutant(
        "weight-map-percentiles-ignored", "fusemycells/postprocess.py",
        "    host = ops.to_host(coarse)\n    low, high = spec.weight_percentiles",
        "    host = ops.to_host(coarse)\n    low, high = 0.0, 100.0",
        ("test/test_ops.py", "test/test_reference.py", COMPOSED), "the weight map is scaled by its extremes",
    ),
    Mutant(
        "weight-map-sign-flipped", "fusemycells/postprocess.py",
        "return np.clip((host - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)",
        "return np.clip((hi - host) / (hi - lo), 0.0, 1.0).astype(np.float32)",
        ("test/test_ops.py", "test/test_reference.py", COMPOSED), "the correction goes where it is not needed",
    ),
    Mutant(
        "weight-map-clipped-at-2", "fusemycells/postprocess.py",
        "return np.clip((host - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)",
        "return np.clip((host - lo) / (hi - lo), 0.0, 2.0).astype(np.float32)",
        ("test/test_ops.py", "test/test_reference.py", COMPOSED), "the correction is over-applied (w up to 2)",
    ),
    Mutant(
        "max-filter-size-off-by-2", "fusemycells/postprocess.py",
        "size: Any = spec.weight_max_filter",
        "size: Any = spec.weight_max_filter + 2",
        ("test/test_postprocess.py", "test/test_reference.py", COMPOSED), "the weight map spreads too far",
    ),
    Mutant(
        "stage1-upsampled-from-the-input", "fusemycells/pipeline.py",
        "return HighRes(x_h, ResizedSource(p1, case.grid_h, ops=case.ops), coarse, p1)",
        "return HighRes(x_h, ResizedSource(coarse, case.grid_h, ops=case.ops), coarse, p1)",
        (COMPOSED,), "the patch network never sees the stage-1 prediction",
    ),
    Mutant(
        "resampling-spacing-reversed", "fusemycells/pipeline.py",
        "grid_h = shape_for_spacing(data.shape, zyx, (channel.target_spacing_um,) * 3)",
        "grid_h = shape_for_spacing(data.shape, zyx[::-1], (channel.target_spacing_um,) * 3)",
        (COMPOSED, "test/test_pipeline.py"), "H has the wrong shape on anisotropic stacks",
    ),
    Mutant(
        "float16-output-not-clipped", "fusemycells/postprocess.py",
        "            planes.clamp_(-FLOAT16_MAX, FLOAT16_MAX)\n",
        "            pass\n",
        ("test/test_postprocess.py", "test/test_pipeline.py"), "a compact output overflows to inf (then NaN)",
    ),
    Mutant(
        "blend-subtracts-the-correction", "fusemycells/postprocess.py",
        "planes.addcmul_(w.clamp_(0.0, 1.0), c)",
        "planes.addcmul_(w.clamp_(0.0, 1.0), c, value=-1.0)",
        (COMPOSED, "test/test_ops.py"), "the correction is applied with the wrong sign",
    ),
    Mutant(
        "stage1-fallback-correction-zero", "fusemycells/patch_stage.py",
        "        planes -= x_h.planes(z0, z1)\n",
        "        planes -= p1_h.planes(z0, z1)\n",
        (COMPOSED, "test/test_pipeline.py"), "level 2 (stage 1 only) adds no correction",
    ),
    Mutant(
        "degradation-levels-shifted", "fusemycells/runtime/ladder.py",
        "return [PatchAttempt(value, level) for level, value in enumerate(dict.fromkeys((overlap, 0.0)))]",
        "return [PatchAttempt(value, level) for level, value in enumerate(dict.fromkeys((overlap, 0.0)), start=1)]",
        (COMPOSED, "test/test_budget.py", "test/test_ladder.py"), "the report names the wrong degradation level",
    ),
    Mutant(
        "output-sigma-not-isotropic", "fusemycells/postprocess.py",
        "return (width_um / float(spacing[0]), width_um / float(spacing[1]), sigma)",
        "return (sigma, sigma, sigma)",
        (COMPOSED, "test/test_postprocess.py"), "anisotropic stacks are blurred along Z by the XY σ",
    ),
    Mutant(
        "adaptive-output-sigma-unused", "fusemycells/pipeline.py",
        "post = with_output_sigma(channel.postprocess, sigma)",
        "post = channel.postprocess",
        ("test/test_pipeline.py",), "the noise-adaptive output σ is reported but not applied",
    ),
    Mutant(
        "refused-file-reported-ok", "fusemycells/files.py",
        '    report.status = "refused"\n    report.error = error_text(report.file, exc)\n',
        '    report.status = "ok"\n    report.error = error_text(report.file, exc)\n',
        ("test/test_pipeline.py",), "a failed file is reported written",
    ),
)


def drift(root: Path, mutants: Sequence[Mutant] = MUTANTS) -> list[str]:
    """Problems with the list against the tree at ``root``: a snippet not found exactly once, a mutant that
    changes nothing, duplicate names, missing test files."""
    problems = []
    names = [m.name for m in mutants]
    problems += [f"duplicate mutant name {n}" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = root / m.file
        count = path.read_text(encoding="utf-8").count(m.original) if path.is_file() else -1
        if count != 1:
            found = "file missing" if count < 0 else f"found {count} times"
            problems.append(f"{m.name}: snippet in {m.file} {found} (expected once): {m.original!r}")
        if m.original == m.mutated:
            problems.append(f"{m.name}: the mutated snippet equals the original")
        for test in m.tests:
            if not test.startswith("-") and not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {test.split('::')[0]} missing")
    return problems


def copy_tree(root: Path, dest: Path) -> None:
    """Copy the files git tracks or would track (untracked, not ignored) from ``root`` into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    for rel in filter(None, listed.split("\0")):
        source = root / rel
        if source.is_file():  # a tracked file deleted in the working tree is left out
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(tree: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, float, str]:
    """(pytest's exit status or None on timeout, seconds, output tail) of ``tests`` in ``tree``."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--timeout", str(int(timeout)), *tests]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - started, "timed out"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.perf_counter() - started, "\n".join(tail[-15:])


def verdict(code: int | None) -> str:
    """'killed', 'killed (collection error)', 'killed (timeout)' or 'survived' for pytest's exit status."""
    if code is None:
        return "killed (timeout)"
    if code == 0:
        return "survived"
    if code == 1:
        return "killed"
    if code in (2, 3, 4):
        return "killed (collection error)"
    raise RuntimeError(f"pytest exit status {code}: the mutant's tests select nothing?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    parser.add_argument("--min-rate", type=float, default=0.9, help="kill rate below which the exit status is 1")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.file:28s} {m.breaks}")
        return 0
    problems = drift(REPO, chosen)
    if problems:
        print("the mutant list no longer matches the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(chosen)} mutants: every snippet matches exactly once")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmc-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(REPO, tree)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
            code, seconds, tail = run_tests(tree, tests, args.timeout * 2)
            print(f"unmutated: pytest exit {code} in {seconds:.0f} s", flush=True)
            if code != 0:
                print(tail, file=sys.stderr)
                return 3
        results = []
        for index, m in enumerate(chosen, start=1):
            path = tree / m.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.original, m.mutated, 1), encoding="utf-8")
            try:
                code, seconds, tail = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            outcome = verdict(code)
            results.append((m, outcome))
            print(f"[{index}/{len(chosen)}] {outcome:26s} {m.name} ({seconds:.0f} s)", flush=True)
            for line in tail.splitlines():
                if line.startswith(("FAILED ", "ERROR ")):  # which test caught it (a flaky one would show here)
                    print(f"    {line}", flush=True)
            if outcome == "survived":
                print(f"    {m.file}: {m.original.strip()!r} → {m.mutated.strip()!r}: {m.breaks}", flush=True)
    killed = sum(outcome != "survived" for _, outcome in results)
    rate = killed / len(results) if results else 1.0
    print(f"\n{killed}/{len(results)} killed ({rate:.0%}) in {time.perf_counter() - started:.0f} s")
    for m, outcome in results:
        if outcome == "survived":
            print(f"  survived: {m.name}: {m.breaks}")
    return 0 if rate >= args.min_rate else 1


if __name__ == "__main__":
    sys.exit(main())
