"""The CPU forward's precision: chosen from the processor's flags, forced by --precision, carried into the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusemycells.backends import OpenVinoRunner, TorchScriptRunner, load_stage
from fusemycells.config import load_manifest
from fusemycells.runtime.budget import BudgetPolicy
from fusemycells.runtime.precision import cpu_flags, cpu_precision

AMX_XEON = {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
AVX2_EPYC = {"fpu", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    ("requested", "flags", "expected"),
    [
        ("auto", AMX_XEON, "bf16"),
        ("auto", {"avx512f", "avx512_bf16"}, "bf16"),
        ("auto", AVX2_EPYC, "fp32"),
        ("auto", set(), "fp32"),
        ("fp32", AMX_XEON, "fp32"),  # --precision fp32 forces full precision where bf16 is native
        ("bf16", AVX2_EPYC, "bf16"),  # asked for explicitly: emulated, slow, but what was asked
    ],
)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(requested: str, flags: set[str], expected: str) -> None:
    assert cpu_precision(requested, flags) == expected


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        cpu_precision("fp8", AMX_XEON)


def test_cpu_flags_are_read_from_the_first_processor_entry(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags.__wrapped__(cpuinfo) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu_flags.__wrapped__(tmp_path / "missing") == frozenset()


def test_policy_takes_the_precision_from_the_cpu_flags_and_reports_it() -> None:
    def make(precision: str, flags: set[str]) -> BudgetPolicy:
        return BudgetPolicy.create(
            "cpu", None, None, 1, precision=precision, read_driver=lambda: None,
            cuda_check=lambda *_: None, read_cpu_flags=lambda: flags,
        )  # fmt: skip

    assert make("auto", AMX_XEON).cpu_precision == "bf16"
    assert make("auto", AVX2_EPYC).cpu_precision == "fp32"
    assert make("fp32", AMX_XEON).as_report()["cpu_precision"] == "fp32"


@pytest.mark.parametrize("stage", ["global", "patch"])
def test_bf16_torchscript_and_openvino_stay_close_to_onnx_runtime_fp32(fixture_resources: Path, stage: str) -> None:
    """Parity of the reduced-precision and the OpenVINO paths on the fixture networks (bf16 runs emulated where
    the CPU lacks it: the numbers, not the speed, are what is checked)."""
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    spec = channel.global_stage if stage == "global" else channel.patch_stage
    shape = (1, 1, *spec.grid) if stage == "global" else (2, 2, *spec.patch_size)
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    reference = load_stage(manifest, spec, "onnx", "cpu", strict=True).runner(batch)
    bf16 = load_stage(manifest, spec, "torchscript", "cpu", strict=True, precision="bf16")
    assert isinstance(bf16.runner, TorchScriptRunner) and bf16.runner.precision == "bf16"
    scale = float(np.sqrt(np.mean(reference**2)))
    reduced = bf16.runner(batch)
    assert float(np.sqrt(np.mean((reduced - reference) ** 2))) < 0.02 * scale  # bf16: 8 bits of mantissa
    assert float(np.abs(reduced - reference).max()) > 1e-5  # really computed in bf16, not fp32 under another name
    openvino = load_stage(manifest, spec, "openvino", "cpu", strict=True)
    assert isinstance(openvino.runner, OpenVinoRunner) and openvino.runner.precision == "fp32"
    np.testing.assert_allclose(openvino.runner(batch), reference, rtol=0, atol=1e-4 * max(scale, 1.0))


def test_fp32_torchscript_on_the_cpu_does_not_autocast(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("nucleus").patch_stage
    batch = np.random.default_rng(1).random((1, 2, *spec.patch_size), dtype=np.float32)
    fp32 = load_stage(manifest, spec, "torchscript", "cpu", strict=True, precision="fp32").runner
    onnx = load_stage(manifest, spec, "onnx", "cpu", strict=True).runner
    assert fp32.precision == "fp32"
    np.testing.assert_allclose(fp32(batch), onnx(batch), rtol=0, atol=1e-5)


def test_openvino_refuses_a_cuda_device_so_that_the_next_backend_runs(fixture_resources: Path) -> None:
    manifest = load_manifest(fixture_resources)
    spec = manifest.channel("nucleus").patch_stage
    with pytest.raises(Exception, match="CPU only"):
        OpenVinoRunner(manifest.root / spec.files["onnx"].path, "cuda")


def test_first_file_plan_uses_the_patch_rate_of_the_backend_and_precision_the_run_uses() -> None:
    """A faster CPU forward becomes a better degradation level: the study's 264×2008×1091 stack at 0.7× this machine's
    speed plans level 1 with ONNX Runtime's rate and level 0 with OpenVINO's (0.54× of it), within the budget."""
    from fusemycells.runtime.budget import CPU_2CORE, cpu_rates
    from fusemycells.runtime.ladder import plan_first_file

    assert cpu_rates("onnx", "fp32") == CPU_2CORE
    assert cpu_rates("openvino", "fp32").patch_s < CPU_2CORE.patch_s
    assert cpu_rates("torchscript", "bf16").patch_s < cpu_rates("torchscript", "fp32").patch_s
    assert cpu_rates("openvino", "bf16") == CPU_2CORE  # unmeasured: ONNX Runtime's fp32 rate, conservative
    shape, spacing = (264, 2008, 1091), (1.0, 0.195, 0.195)
    onnx = plan_first_file(shape, spacing, 480.0, rates=cpu_rates("onnx"), speed=0.7)
    openvino = plan_first_file(shape, spacing, 480.0, rates=cpu_rates("openvino"), speed=0.7)
    assert (onnx.level, openvino.level) == (1, 0)
    assert openvino.total_s <= 480.0


def test_budget_plan_defaults_to_what_auto_picks_here() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import budget_plan

    precision, backend = budget_plan.run_backend("auto", "auto")
    assert precision == cpu_precision("auto", cpu_flags())
    pytest.importorskip("openvino")
    assert backend == ("torchscript" if precision == "bf16" else "openvino")
    assert budget_plan.run_backend("onnx", "fp32") == ("fp32", "onnx")


def test_openvino_patch_stage_runs_a_batch_as_concurrent_single_patch_requests_with_the_same_output(
    fixture_resources: Path,
) -> None:
    """The patch stage compiles for throughput (one stream per patch of a batch, at most one per thread) and its
    batches come back in order, equal to one whole-batch request; the global stage keeps one request."""
    pytest.importorskip("openvino")
    manifest = load_manifest(fixture_resources)
    channel = manifest.channel("nucleus")
    spec = channel.patch_stage
    patch = load_stage(manifest, spec, "openvino", "cpu", strict=True, threads=2).runner
    single = load_stage(manifest, spec, "openvino", "cpu", strict=True, threads=1).runner
    glob = load_stage(manifest, channel.global_stage, "openvino", "cpu", strict=True, threads=2).runner
    assert (patch.streams, single.streams, glob.streams) == (min(2, spec.batch_size), 1, 1)
    batch = np.random.default_rng(2).random((3, 2, *spec.patch_size), dtype=np.float32)
    batch[1] *= 4.0  # patches that differ, so that an order mix-up shows
    whole = OpenVinoRunner(manifest.root / spec.files["onnx"].path, "cpu", threads=2)(batch)
    np.testing.assert_allclose(patch(batch), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(patch(batch[:1]), whole[:1], rtol=0, atol=1e-6)
