"""Device-fault injection, for tests and for the GPU check only: makes the device path fail on purpose.

``FUSEMYCELLS_INJECT_DEVICE_FAULT`` (read by ``inference.py``) names where the device fails:

- ``load``: the patch network's warm-up right after loading;
- ``global``: the global stage's forward pass;
- ``patch:N``: the N-th forward batch of the patch stage (its warm-up not counted);
- ``ops[:SECTION[:N]]``: the N-th (default first) entry of the non-network torch steps into a profile
  section (:data:`fusemycells.runtime.timing.SECTIONS`; default ``output_filter_s``: the output filter and the
  percentile pass; ``resampling_s``, ``blend_s`` (N: the N-th slab), ...).

On a CUDA run the fault is a real one: a device-side assert (an out-of-range index on the GPU), after
which the CUDA context fails every later call, as after an illegal memory access; the pipeline must
rerun the step on the CPU and stay there (:meth:`fusemycells.runtime.budget.BudgetPolicy.device_fault`). On a
CPU run the switch does nothing but log a warning (there is no device to fail). Tests on the CPU pass
their own ``fault`` (an exception with a real CUDA or ONNX Runtime error text) to :func:`inject`
through the :class:`~fusemycells.pipeline.Fuser`'s ``loader`` and ``ops`` dependencies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FAULT_ENV = "FUSEMYCELLS_INJECT_DEVICE_FAULT"
"""The environment switch (tests and ``benchmarks/gpu_check.sh`` only)."""
STEPS = ("load", "global", "patch", "ops")


@dataclass(frozen=True)
class FaultPlan:
    """Where the injected device fault happens: ``step`` (see :data:`STEPS`), at its ``at``-th call
    (patch forwards) or ``at``-th entry into ``section`` (ops)."""

    step: str
    at: int = 1
    section: str = "output_filter_s"


def parse_fault_plan(text: str) -> FaultPlan:
    """The :class:`FaultPlan` of a switch value (``global``, ``patch:3``, ``ops:blend_s:2``, ``load``);
    ValueError when it names none."""
    step, _, arg = text.strip().partition(":")
    if step not in STEPS or (arg and step in ("load", "global")):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected load, global, patch:N or ops[:SECTION[:N]]")
    if step == "patch":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"{FAULT_ENV}={text!r}: patch needs the forward batch that fails, patch:N with N ≥ 1")
        return FaultPlan("patch", at=int(arg))
    if step == "ops" and arg:
        section, _, at = arg.partition(":")
        if at and (not at.isdigit() or int(at) < 1):
            raise ValueError(f"{FAULT_ENV}={text!r}: the entry that fails is a number ≥ 1")
        return FaultPlan("ops", at=int(at or 1), section=section)
    return FaultPlan(step)


def cuda_fault() -> None:
    """Raise a real CUDA error: a device-side assert from an out-of-range index on the GPU (the CUDA
    context is unusable afterwards, as after an illegal memory access)."""
    import torch

    values = torch.zeros(4, device="cuda")
    index = torch.tensor([1 << 20], device="cuda")
    values[index] = 1.0  # the indexing kernel's bounds check asserts on the device
    torch.cuda.synchronize()  # the asynchronous error surfaces here at the latest
    raise RuntimeError("CUDA error: the injected device-side assert did not fail (injected fault)")


class FaultyRunner:
    """A stage runner that calls ``fault()`` (which raises) at its ``at``-th counted call; the first
    ``skip`` calls (the warm-up) are not counted. Otherwise the wrapped runner's output."""

    def __init__(self, runner: Any, fault: Callable[[], None], at: int = 1, skip: int = 0) -> None:
        self.runner, self.fault, self.at, self.skip = runner, fault, at, skip
        self.backend, self.provider, self.device = runner.backend, runner.provider, runner.device
        self.precision = runner.precision
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls - self.skip == self.at:
            self.fault()
        return self.runner(batch)


def faulty_ops(ops: Any, section: str, fault: Callable[[], None], at: int = 1) -> Any:
    """``ops`` whose ``at``-th entry into profile ``section`` calls ``fault()`` (which raises)."""
    entries = [0]
    plain = ops.section

    @contextmanager
    def section_with_fault(name: str) -> Iterator[None]:
        with plain(name):
            if name == section:
                entries[0] += 1
                if entries[0] == at:
                    fault()
            yield

    ops.section = section_with_fault  # on this one Ops object only
    return ops


def inject(loader: Any, ops_factory: Any, plan: FaultPlan, fault: Callable[[], None]) -> tuple[Any, Any]:
    """A stage loader and an ops factory (see :class:`fusemycells.pipeline.Fuser`) that fail on the device
    (any device but 'cpu') as ``plan`` says, by calling ``fault()``; on the CPU they are ``loader`` and
    ``ops_factory`` unchanged."""

    def faulty_loader(manifest: Any, spec: Any, backend: str, device: str, **options: Any) -> Any:
        loaded = loader(manifest, spec, backend, device, **options)
        is_patch = spec.patch_size is not None
        if device == "cpu" or plan.step == "ops" or (plan.step == "global") == is_patch:
            return loaded
        skip = 0 if plan.step == "load" else int(is_patch)  # a patch stage's first call is its warm-up
        return replace(loaded, runner=FaultyRunner(loaded.runner, fault, plan.at, skip))

    def faulty_ops_factory(device: str, *args: Any, **kwargs: Any) -> Any:
        ops = ops_factory(device, *args, **kwargs)
        return ops if device == "cpu" or plan.step != "ops" else faulty_ops(ops, plan.section, fault, plan.at)

    return faulty_loader, faulty_ops_factory


def from_environment(device: str, loader: Any, ops_factory: Any) -> tuple[Any, Any]:
    """``loader`` and ``ops_factory`` with the fault of :data:`FAULT_ENV` injected on a CUDA run; unchanged
    without the switch, and on a CPU run (a warning says the switch is ignored). ValueError for a value
    that names no fault (a setup error)."""
    text = os.environ.get(FAULT_ENV, "").strip()
    if not text:
        return loader, ops_factory
    plan = parse_fault_plan(text)
    if device != "cuda":
        log.warning("%s=%s ignored: the run is on the %s (no device to fail)", FAULT_ENV, text, device)
        return loader, ops_factory
    log.warning("%s=%s: a CUDA fault will be injected (tests and gpu_check only)", FAULT_ENV, text)
    return inject(loader, ops_factory, plan, cuda_fault)
