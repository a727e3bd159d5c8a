"""The napari plugin's work, without Qt: check a layer, fuse its pixels with :class:`fusemycells.pipeline.Fuser`
(progress and cancel through a :class:`Listener`), and say which layers to add.

Arrays are ZYX; spacings (z, y, x) in µm, as a napari layer's ``scale`` holds them when the stack was opened
with the plugin's reader (:mod:`fusemycells.napari.reader`). The fused output is the pipeline's float32
normalised output (``--output-dtype float32`` of the command line), on the input's grid.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells.config import DEFAULT_RESOURCES, Manifest, load_manifest, resolve_resources_dir
from fusemycells.report import CaseReport, case_entry
from fusemycells.sources import iter_planes

log = logging.getLogger(__name__)
Spacing3 = tuple[float, float, float]
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CHANNELS = ("nucleus", "membrane")
MIN_SIDE = 2
"""Fewest voxels along any axis of a stack the widget accepts (a single plane is 2D, not a stack)."""


class LayerError(ValueError):
    """The layer cannot be fused (the message says why, for the widget's status line)."""


class Cancelled(BaseException):
    """The person pressed Cancel. A ``BaseException``, like ``KeyboardInterrupt``: the pipeline reruns a step
    on the CPU after any ``Exception`` on the GPU (a device fault), and a cancel must stop, not rerun."""


def volume_of(data: Any, *, rgb: bool = False, multiscale: bool = False) -> np.ndarray:
    """A copy of a layer's pixels as one ZYX numpy array (the fusion consumes its input's buffer), or
    :class:`LayerError` saying why it cannot be fused: not 3D, RGB, multiscale, an axis under
    :data:`MIN_SIDE` voxels, a pixel type other than integers or floats."""
    if multiscale:
        raise LayerError("a multiscale layer: open the full-resolution stack as a single-scale layer")
    if rgb:
        raise LayerError("an RGB layer: the fusion takes one grey-level channel (ZYX)")
    shape = tuple(int(n) for n in data.shape)
    if len(shape) != 3:
        raise LayerError(f"the fusion takes a 3D (ZYX) stack; this layer is {len(shape)}D {shape}")
    if min(shape) < MIN_SIDE:
        raise LayerError(f"the stack {shape} has fewer than {MIN_SIDE} voxels along an axis")
    dtype = np.dtype(data.dtype)
    if dtype.kind not in "uif":
        raise LayerError(f"pixel type {dtype} cannot be fused (integer or floating-point grey levels only)")
    return np.array(data, copy=True)


def spacing_of(scale: Sequence[float]) -> Spacing3:
    """The (z, y, x) µm spacing of a 3D layer's ``scale`` (its last three entries), or :class:`LayerError`
    when one is not a finite number > 0."""
    values = [float(v) for v in list(scale)[-3:]]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise LayerError(f"spacing must be three numbers > 0 (µm, z y x); got {values}")
    return values[0], values[1], values[2]


def chosen_spacing(fields: Sequence[float], scale: Sequence[float], decimals: int) -> Spacing3:
    """The spacing (z, y, x) µm the widget's fields ask for: the layer's exact ``scale`` on each axis whose field
    still shows it (a spin box keeps ``decimals`` decimals: 2.87460934 shows as 2.8746), else the field's
    value (edited by the person)."""
    exact = list(scale)[-3:]
    if len(exact) != 3:
        return spacing_of(fields)
    kept = [s if round(float(s), decimals) == round(float(f), decimals) else f for f, s in zip(fields, exact)]
    return spacing_of(kept)


def guess_channel(name: str, metadata: dict[str, Any], channels: Sequence[str]) -> str:
    """The channel a layer shows: its metadata's ``channel`` (the plugin's reader puts it there), else a
    channel name found in the layer's name, else the first of ``channels``."""
    named = str(metadata.get("channel", "")).lower()
    if named in channels:
        return named
    lowered = name.lower()
    return next((c for c in channels if c in lowered), channels[0])


@dataclass
class FusionRequest:
    """One fusion asked for in the widget: the pixels (ZYX, a copy: consumed), their spacing (z, y, x) µm,
    the channel, the device ('auto', 'cpu', 'cuda'), the time budget (s, from the press of the button)."""

    data: np.ndarray
    spacing: Spacing3
    channel: str
    device: str = "auto"
    time_budget_s: float = 480.0
    name: str = "image"


@dataclass
class FusionResult:
    """The fused stack (float32, ZYX, the input's grid) and where the networks acted: the blending weight on
    the pipeline's coarse diff grid (ZYX, 0..1; None when the networks were not blended in)."""

    output: np.ndarray
    spacing: Spacing3
    channel: str
    name: str
    weight: np.ndarray | None
    report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the status: seconds, whether and how much the networks acted, the degradation."""
        seconds = self.report.get("seconds", {}).get("total")
        took = "" if seconds is None else f" in {seconds:.1f} s"
        return f"fused{took}: {networks_note(self.report)}"

    def layers(self, with_weight: bool = True) -> list[tuple[np.ndarray, dict[str, Any], str]]:
        """napari layer-data tuples: the fused stack with the input's scale and, with ``with_weight``, the
        blending weight laid over the same physical extent (a 1-voxel layer of 0 when the networks did not act)."""
        fused = (
            self.output,
            {
                "name": f"{self.name} fused ({self.channel}, FuseMyCells)",
                "scale": self.spacing,
                "metadata": {"fusemycells_report": self.report},
            },
            "image",
        )
        if not with_weight:
            return [fused]
        weight = self.weight if self.weight is not None else np.zeros((1, 1, 1), dtype=np.float32)
        scale, translate = coarse_grid_placement(self.output.shape, self.spacing, weight.shape)
        what = "network weight 0-1" if self.weight is not None else "network weight: 0, networks off"
        overlay = {
            "name": f"{self.name} {what}",
            "scale": scale,
            "translate": translate,
            "colormap": "magma",
            "contrast_limits": (0.0, 1.0),
            "blending": "additive",
            "opacity": 0.6,
        }
        return [fused, (weight, overlay, "image")]


def networks_note(report: dict[str, Any]) -> str:
    """In words, whether the networks acted on this case (from its report entry: trust, gate, degradation, the
    weight map's statistics), worded as on the QC figure (:func:`fusemycells.evaluation.qc.networks_note`)."""
    from fusemycells.evaluation.qc import networks_note as note

    return note(report)


def coarse_grid_placement(
    shape: Sequence[int], spacing: Sequence[float], coarse: Sequence[int]
) -> tuple[Spacing3, Spacing3]:
    """(scale, translate) in µm (z, y, x) that lay a ``coarse``-voxel ZYX map over the same physical extent as a
    ``shape`` stack of ``spacing`` µm in napari (voxel centres at translate + index × scale; pixel-area
    resizing, as the pipeline's weight map is resized to the input grid)."""
    scale = tuple(n * s / c for n, s, c in zip(shape, spacing, coarse))
    translate = tuple(0.5 * (big - s) for big, s in zip(scale, spacing))
    return scale, translate  # type: ignore[return-value]


@dataclass
class Outcome:
    """How a fusion ended: its ``result``, or the ``error`` message, or neither (cancelled)."""

    result: FusionResult | None = None
    error: str | None = None


class Listener:
    """How a running fusion reports progress (``report(text, fraction 0..1)``, called from the worker thread)
    and learns that it was cancelled (``cancel``, set from the GUI thread)."""

    def __init__(self, report: Callable[[str, float], None] | None = None) -> None:
        self.report = report or (lambda text, fraction: None)
        self.cancel = threading.Event()

    def advance(self, text: str, fraction: float) -> None:
        """Report progress, or raise :class:`Cancelled` once Cancel was pressed."""
        if self.cancel.is_set():
            raise Cancelled()
        self.report(text, min(1.0, max(0.0, fraction)))


class _PatchProgress:
    """The patch stage's :class:`fusemycells.runtime.progress.Progress`, relayed to a :class:`Listener` (the
    stage spans fractions ``span`` of the whole run)."""

    def __init__(self, listener: Listener, total: int, unit: str, span: tuple[float, float]) -> None:
        self.listener, self.total, self.unit, self.span = listener, max(1, int(total)), unit, span

    def update(self, done: int, elapsed_s: float, note: str | None = None) -> None:
        low, high = self.span
        self.listener.advance(f"{self.unit} {done}/{self.total}", low + (high - low) * done / self.total)

    def close(self) -> None:
        pass


PATCH_SPAN = (0.15, 0.85)
"""The share of the progress bar the patch stage fills (loading and the global stage before, the output after)."""


class FusionEngine:
    """Loads a weights folder's networks once per device and fuses arrays with them (the widget's worker thread
    calls :meth:`run`; one run at a time). ``resources``: the weights folder (None: as the command line, the
    Grand Challenge model folder when valid, else the bundled weights); ``loader`` as :class:`Fuser`'s."""

    def __init__(self, resources: Path | None = None, loader: Any = None) -> None:
        self.resources, self.loader = resources, loader
        self._manifest: Manifest | None = None
        self._fusers: dict[str, Any] = {}
        self._listener: Listener | None = None

    def channels(self) -> tuple[str, ...]:
        """The channels the weights serve (the manifest's; the two of the challenge when it cannot be read)."""
        try:
            return tuple(sorted(self.manifest().channels)) or DEFAULT_CHANNELS
        except Exception:  # shown when a fusion is asked for (load_manifest's message)
            return DEFAULT_CHANNELS

    def time_budget_s(self) -> float:
        """The manifest's time budget (s), the default of the widget's field."""
        try:
            return float(self.manifest().time_budget_s or 480.0)
        except Exception:
            return 480.0

    def manifest(self) -> Manifest:
        if self._manifest is None:
            folder, _ = resolve_resources_dir(self.resources, default=DEFAULT_RESOURCES)
            self._manifest = load_manifest(folder)
        return self._manifest

    def fuser(self, device: str) -> Any:
        """The :class:`Fuser` for ``device`` (created, with its networks loaded lazily, on first use)."""
        if device not in self._fusers:
            from fusemycells.pipeline import Fuser

            extra = {} if self.loader is None else {"loader": self.loader}
            self._fusers[device] = Fuser.from_resources(
                self.resources, device=device, time_budget_s=None, keep_input=False, progress=self._patch_progress,
                **extra,
            )  # the widget's run gives its own deadline (its time budget field) and copies the layer's data itself
        return self._fusers[device]

    def _patch_progress(self, total: int, unit: str, step: int = 1) -> _PatchProgress:
        listener = self._listener or Listener()
        return _PatchProgress(listener, total, unit, PATCH_SPAN)

    def run(self, request: FusionRequest, listener: Listener) -> Outcome:
        """Fuse ``request`` (its ``data`` is consumed): the result, or cancelled through ``listener``, or why it
        failed (a stack over the RAM budget, weights that cannot be loaded, ...; the traceback goes to the log).
        Never raises an ``Exception``: napari would show a traceback for an error that leaves its worker."""
        self._listener = listener
        try:
            return Outcome(result=self._run(request, listener))
        except Cancelled:
            return Outcome()
        except Exception as exc:
            log.error("fusion of %s failed", request.name, exc_info=exc)
            return Outcome(error=str(exc) or type(exc).__name__)
        finally:
            self._listener = None

    def _run(self, request: FusionRequest, listener: Listener) -> FusionResult:
        started = time.perf_counter()
        deadline = started + request.time_budget_s
        listener.advance("loading the networks", 0.0)
        fuser = self.fuser(request.device)
        fuser.check_memory(request.data.shape, request.data.dtype, request.spacing)
        fuser.load_stages(request.channel)
        listener.advance("global stage", 0.05)
        report = CaseReport(file=request.name)
        fused = fuser.fuse(
            request.data, request.spacing, request.channel, deadline=deadline, output_dtype="float32", report=report
        )
        listener.advance("output", PATCH_SPAN[1])
        output = self._materialise(fuser, fused, listener)
        report.status = "ok"
        report.output_dtype = "float32"
        report.seconds["total"] = round(time.perf_counter() - started, 3)
        entry = case_entry(report)
        return FusionResult(output, request.spacing, request.channel, request.name, fused.weight, entry)

    @staticmethod
    def _materialise(fuser: Any, fused: Any, listener: Listener) -> np.ndarray:
        """The lazy output as one array, slab by slab (cancel is checked between slabs); after a device fault
        while it is computed, computed again on the CPU (as :meth:`Fuser.write` does for a file)."""
        try:
            return _collect(fused.output, listener)
        except Exception as exc:
            if fused.on_cpu is None or not fuser.policy.device_fault("output filter", exc):
                raise
        fused.output = fused.on_cpu()
        return _collect(fused.output, listener)


def _collect(source: Any, listener: Listener) -> np.ndarray:
    """A plane source as one float32 ZYX array, reporting the share of planes done."""
    out = np.empty(source.shape, dtype=np.float32)
    depth = max(1, source.shape[0])
    for z0, z1, planes in iter_planes(source):
        out[z0:z1] = planes
        listener.advance("output", PATCH_SPAN[1] + (1.0 - PATCH_SPAN[1]) * z1 / depth)
    return out
