"""One path from file to file: read (any registered format) → fuse → write, used by ``inference.py``
(:func:`run_directory`) and by ``fusemycells.batch`` (one :func:`process_file` per job) alike.

:func:`process_file` never raises for a problem with its file: an input that cannot be read or is refused
by validation is ``refused`` (no output); a readable one that fails otherwise gets the last resort, the
normalised input (``fallback_identity``); a device fault while the output is written is retried on the CPU.
Formats come from the reader/writer registry (:mod:`fusemycells.io.formats`); volumes are ZYX, spacings
(z, y, x) µm.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells import postprocess
from fusemycells.config import ManifestError, PostprocessSpec
from fusemycells.io import formats
from fusemycells.io.scan import list_inputs
from fusemycells.io.tiff import check_output_name
from fusemycells.io.volume import Format, InputError, ReadOptions, Volume, WriteOptions
from fusemycells.ops import Ops
from fusemycells.pipeline import Fused, Fuser, note_device_fault, timed, warn
from fusemycells.preprocess import sanitise_inplace
from fusemycells.report import CaseReport
from fusemycells.runtime.allocator import reuse_freed_memory
from fusemycells.runtime.budget import MemoryBudgetExceeded
from fusemycells.runtime.devices import free_device_cache, peak_rss_mib, peak_vram_mib
from fusemycells.runtime.ladder import learn_finish_cost
from fusemycells.sources import ArraySource, PlaneSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conversion:
    """How one file is read and written. The default is ``inference.py``'s: the format recognised from the
    path (by name, else TIFF), the output in the same format under the same name, the channel from the
    metadata."""

    input_format: str | None = None  # a registered format's name (None: recognised from the path)
    output_format: str | None = None  # None: the input's
    output_name: str | None = None  # None: :func:`fusemycells.io.formats.output_name`
    channel: str | None = None  # forces the channel ('nucleus' / 'membrane')
    level: int = 0  # OME-Zarr input: the resolution level read
    channel_index: int | None = None  # OME-Zarr input: the channel of a non-singleton c axis
    write: WriteOptions = field(default_factory=WriteOptions)


@dataclass(frozen=True)
class Route:
    """A file's resolved reader, writer and output path."""

    source: Path
    reader: Format
    writer: Format
    output: Path
    how: Conversion

    def read(self, check: Callable[..., None] | None = None) -> Volume:
        """The input as a :class:`Volume` (``check``: the memory budget's, before the pixels are read)."""
        how = self.how
        options = ReadOptions(check=check, channel=how.channel, level=how.level, channel_index=how.channel_index)
        return self.reader.read(self.source, options)

    def write(self, source: Any, like: Volume) -> None:
        """Write the ZYX ``source`` (array or plane source) at the output path like the input ``like``."""
        self.writer.write(self.output, source, like, self.how.write)


def route(path: Path, output_dir: Path, how: Conversion) -> Route:
    """Where and how ``path`` is read and written (``ValueError`` for an unknown format name)."""
    path = Path(path)
    if how.input_format is not None:
        reader = formats.get(how.input_format)
    else:
        reader = formats.recognise(path) or formats.named_like(path.name) or formats.get(formats.DEFAULT)
    writer = reader if how.output_format is None else formats.get(how.output_format)
    name = how.output_name or formats.output_name(path.name, writer)
    return Route(path, reader, writer, Path(output_dir) / name, how)


def process_file(
    path: Path,
    output_dir: Path,
    fuser: Fuser,
    output_dtype: str,
    deadline: float | None = None,
    how: Conversion | None = None,
) -> CaseReport:
    """Read, fuse and write one file; never raises for a problem with this file (see ``status``).

    The output name is checked first (before any pixel is read); ``seconds`` gets ``read``,
    ``load_weights`` (the channel's networks, when not loaded yet), the stages, ``write`` and ``total``.
    A file that cannot be read, or is refused by validation (:func:`is_refusal`), is ``refused`` with no
    output; a readable one that fails otherwise (a bug, or host memory running out while it is
    processed) gets the last resort, :func:`write_identity` (``fallback_identity``). ``deadline``: a
    ``time.perf_counter()`` value; ``how``: formats and options (default: :class:`Conversion`'s).
    """
    report = CaseReport(file=Path(path).name)
    started = time.perf_counter()
    before = fuser.policy.health.fault
    log.info("[%s] reading", report.file)
    try:
        target = route(path, output_dir, how or Conversion())
        check_output_name(target.output.parent, target.output.name)
        with timed(report.seconds, "read"):
            volume = target.read(check=fuser.check_memory)
    except Exception as exc:  # one bad file must not lose the others
        refuse(report, exc)
    else:
        try:
            fuse_and_write(volume, target, fuser, output_dtype, deadline, report)
        except Exception as exc:
            del volume  # the input's pixels (possibly overwritten by the blend): the last resort reads them again
            if is_refusal(exc):
                refuse(report, exc)
            else:
                write_identity(target, fuser, output_dtype, report, exc)
    note_device_fault(report, fuser.policy.health.fault, before)
    report.seconds["total"] = round(time.perf_counter() - started, 3)
    record_peaks(report)
    return report


def fuse_and_write(
    volume: Volume, target: Route, fuser: Fuser, output_dtype: str, deadline: float | None, report: CaseReport
) -> None:
    """:func:`process_file`'s work on a volume that was read: load the networks, fuse, write."""
    for warning in volume.warnings:
        warn(report, warning)
    if volume.data.dtype != np.uint16:
        warn(report, f"input dtype {volume.data.dtype} converted; output {output_dtype}")
    name = target.source.name
    log.info("[%s] shape %s, spacing %s µm, channel %s", name, volume.data.shape, volume.spacing, volume.channel)
    with timed(report.seconds, "load_weights"):
        fuser.load_stages(volume.channel)
    fused = fuser.fuse(
        volume.data, volume.spacing, volume.channel, deadline=deadline, output_dtype=output_dtype, report=report
    )
    with timed(report.seconds, "write"), fused.profile.section("write_s"), reuse_freed_memory():
        write_fused(fuser, fused, target, volume)
    log.info("[%s] profile (s): %s", name, fused.profile.describe())
    report.output_dtype = output_dtype
    report.status = "ok"


def write_fused(fuser: Fuser, fused: Fused, target: Route, like: Volume) -> None:
    """Write ``fused``'s output (computed while it is written) like the input ``like``; after a device fault
    while computing it, the output is computed on the CPU and written again."""
    try:
        target.write(fused.output, like)
        return
    except Exception as exc:
        if fused.on_cpu is None or isinstance(exc, InputError):
            raise
        if not fuser.policy.device_fault("output filter", exc):
            raise
    free_device_cache()
    fused.output = fused.on_cpu()
    target.write(fused.output, like)


def is_refusal(exc: BaseException) -> bool:
    """Whether an error refuses the file (no output, exit 1): the input itself is refused (:class:`InputError`:
    unreadable, invalid, an output name that cannot be made) or it is too big for the RAM budget
    (:class:`MemoryBudgetExceeded`, before its pixels are read). Weights the setup cannot serve for the file
    (:class:`ManifestError`: no weights for its channel, broken weight files) are not the input's fault: the
    file gets the identity output (:func:`write_identity`), as for any other failure after the read."""
    return isinstance(exc, (InputError, MemoryBudgetExceeded))


def error_text(file: str, exc: BaseException) -> str:
    """A report's ``error`` for ``exc`` on ``file``."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, MemoryBudgetExceeded):
        return f"{file}: out of memory budget: {exc}"
    if isinstance(exc, MemoryError):
        return f"{file}: ran out of memory while processing (MemoryError: {exc})"
    return f"{file}: {type(exc).__name__}: {exc}"


def refuse(report: CaseReport, exc: Exception) -> None:
    """Mark a file refused with a message saying what happened; unexpected errors are logged with
    their traceback at ERROR (in the container the log is all there is)."""
    report.status = "refused"
    report.error = error_text(report.file, exc)
    log.error("[%s] refused: %s", report.file, report.error, exc_info=None if is_refusal(exc) else exc)


def identity_output(data: np.ndarray, spec: PostprocessSpec, dtype: str) -> PlaneSource:
    """The last resort's output of a ZYX stack: the input, percentile-normalised as the pipeline's output
    is (``spec.output_percentiles``, the same strided sample and affine map), then ``dtype`` (uint16:
    the normalised range scaled to 0..65535), with numpy only: no device, no network, no output filter.
    ``data`` is sanitised in place (non-finite voxels replaced, as the pipeline does)."""
    if not data.flags.writeable:
        data = data.copy()
    sanitise_inplace(data)
    plain = replace(spec, output_max_filter=0, output_sigma_knots=())
    return postprocess.final_source(ArraySource(data), plain, dtype, ops=Ops("cpu"))


def write_identity(target: Route, fuser: Fuser, output_dtype: str, report: CaseReport, exc: BaseException) -> None:
    """The last resort for a readable input that failed for a reason not its own: the identity output
    (:func:`identity_output`, N-SSIM 0 by definition, where a missing output fails the job), written
    with an ERROR line and ``status: fallback_identity``. The input is read again: the failed attempt
    may have overwritten its buffer. Refused when even this fails.

    A ``MemoryError`` while a read file is processed gets this too: the identity needs the input and
    one slab, far less than the pipeline's peak (a stack too big for the RAM budget was refused before
    its pixels were read).
    """
    report.error = error_text(report.file, exc)
    log.error(
        "[%s] failed: %s; writing the identity output (the normalised input)", report.file, report.error, exc_info=exc
    )
    traceback.clear_frames(exc.__traceback__)  # release the failed attempt's arrays before reading the input again
    try:
        with timed(report.seconds, "identity_write"):
            volume = target.read()
            try:
                spec = fuser.manifest.channel(volume.channel).postprocess
            except ManifestError:
                spec = PostprocessSpec()
            target.write(identity_output(volume.data, spec, output_dtype), volume)
    except Exception as second:
        report.status = "refused"
        report.error = f"{report.error}; the identity output failed too: {type(second).__name__}: {second}"
        log.error("[%s] refused: %s", report.file, report.error, exc_info=second)
        return
    report.status = "fallback_identity"
    report.output_dtype = output_dtype
    report.warnings.append(f"fallback_identity: the normalised input was written after {report.error}")


def record_peaks(report: CaseReport) -> None:
    """Peak RSS and VRAM so far into the report, and the file's closing log line."""
    report.peak_rss_mib = round(peak_rss_mib(), 1)
    vram = peak_vram_mib()
    report.peak_vram_mib = None if vram is None else round(vram, 1)
    vram_text = "" if vram is None else f", peak VRAM {report.peak_vram_mib:.0f} MiB"
    total = report.seconds.get("total", 0.0)
    log.info(
        "[%s] %s in %.1f s (peak RSS %.0f MiB%s)", report.file, report.status, total, report.peak_rss_mib, vram_text
    )


def run_directory(
    input_dir: Path,
    output_dir: Path,
    fuser: Fuser,
    output_dtype: str,
    on_case: Callable[[CaseReport], None] | None = None,
    formats_read: Sequence[Format] | None = None,
) -> list[CaseReport]:
    """Process every input in ``input_dir`` into ``output_dir`` (same file names, same formats).

    ``formats_read``: the formats taken from the folder (default TIFF only, as Grand Challenge:
    :func:`fusemycells.io.scan.scan_inputs`). ``on_case(report)`` is called after each file (so that a
    caller stopped midway, e.g. by SIGTERM, can report the files done).
    """
    files = list_inputs(input_dir, formats_read)
    log.info("%d input file(s) in %s", len(files), input_dir)
    reports = []
    for index, path in enumerate(files, start=1):
        log.info("file %d/%d: %s", index, len(files), path.name)
        deadline = fuser.policy.file_deadline(files_left=len(files) - index + 1)
        reports.append(process_file(path, output_dir, fuser, output_dtype, deadline=deadline))
        learn_finish_cost(fuser.costs, reports[-1])
        if on_case is not None:
            on_case(reports[-1])
    return reports
