"""Fuse many stacks on ``dask.distributed`` workers (a local cluster, or an existing scheduler).

    python -m fusemycells.batch INPUT... --output DIR [--scheduler ADDRESS | --workers N] [--report FILE]

INPUT are files or images of the registered formats (:mod:`fusemycells.io.formats`: TIFF, OME-Zarr,
.mha/.mhd/.nrrd/.nii/.nii.gz through SimpleITK) or folders (the inputs directly inside). Each file
is one task; each worker runs one file at a time through the same ``fusemycells.files.process_file`` as
``inference.py`` and keeps its loaded networks for the following files (a worker plugin holds one
``Fuser`` per worker process). An output is written atomically, then a completion record ``<output>.done.json``
(input size and time, settings, output size and sha256); a later run skips outputs whose record
verifies and redoes the others. A task whose worker dies is retried on another worker by the
scheduler (up to ``distributed.scheduler.allowed-failures`` deaths, then the file is refused);
the report counts each file's lost attempts and the workers lost. An output folder that is, or
lies inside, an input folder or Zarr store is refused before any work, as is an unwritable
``--report``. SIGTERM and SIGINT (Ctrl-C) stop the run as they stop ``inference.py``: one log
line, the local workers stopped, the temporary files of the files in progress removed, the report
of what was finished. Exit code as ``inference.py``: 0 every file written or verified, 1 some
refused, 2 setup error, 143 SIGTERM, 130 SIGINT. The ``--report`` JSON is documented key by key in
``fusemycells/report.schema.json``.

Needs the optional packages of ``requirements-scale.txt`` (dask, distributed; zarr and ome-zarr
for OME-Zarr; SimpleITK for its formats); this module imports without them and says what to install.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fusemycells import program_name
from fusemycells.config import BACKENDS
from fusemycells.io import formats
from fusemycells.io.omezarr import INSTALL_HINT, NOT_OME, is_zarr_store
from fusemycells.io.paths import ensure_writable, note_stale_partials, remove_partials, report_path_problem
from fusemycells.io.scan import log_not_read, not_input_reason, unknown_reason
from fusemycells.io.tiff import PARTIAL_PATTERN
from fusemycells.io.volume import MissingDependency
from fusemycells.report import WRITTEN_STATUSES, batch_report, case_entry, manifest_sha256, write_report
from fusemycells.runtime.progress import Bar, configure_logging, interactive, log_lines_only
from fusemycells.runtime.stopping import Stopped, run_stoppable, stop_flags

if TYPE_CHECKING:
    from fusemycells.pipeline import Fuser

try:  # optional: the package must import without dask (the container never has it)
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - exercised by the import test in a subprocess
    WorkerPlugin = object  # type: ignore[misc,assignment]

log = logging.getLogger("fusemycells.batch")

PLUGIN_NAME = "fusemycells-fuser"
RECORD_SUFFIX = ".done.json"
RECORD_FORMAT = 1
PARTIAL_PATTERNS = (PARTIAL_PATTERN, ".*.partial")
"""Temporary outputs in the output folder: TIFFs being written (``.fmc-*.partial``), OME-Zarr stores
being built (``.<name>.partial``) and completion records (``.<name>.done.json.partial``)."""
TORCH_HINT = "torch is missing: install requirements.txt first (README, Quick start: torch, then requirements.txt)"


class SetupError(RuntimeError):
    """The run cannot start (inputs, output folder, weights, cluster); exit code 2."""


def require_torch(where: str = "") -> None:
    """Raise :class:`MissingDependency` naming the install when torch cannot be imported (``where``: appended)."""
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        raise MissingDependency(TORCH_HINT + where) from exc


def require_distributed() -> Any:
    """The ``distributed`` module, or :class:`MissingDependency` naming the install command."""
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependency(
            f"fusemycells.batch needs the optional packages dask and distributed ({exc.name} is missing): "
            f"{INSTALL_HINT}"
        ) from exc
    return distributed


# --------------------------------------------------------------------------------------------
# Jobs: which input goes where


@dataclass(frozen=True)
class Job:
    """One input file or OME-Zarr image and where its fused output goes (picklable, sent to a worker)."""

    source: str
    output: str
    input_format: str  # a registered format (fusemycells.io.formats): tiff, ome-zarr, mha, nrrd, nii.gz, ...
    output_format: str  # idem
    output_dtype: str = "uint16"
    level: int = 0  # OME-Zarr input: resolution level read
    channel: str | None = None  # forces the channel ('nucleus' / 'membrane'); None: from the metadata
    channel_index: int | None = None  # OME-Zarr input: the channel of a non-singleton c axis fused
    zarr_levels: int | None = None  # OME-Zarr output: pyramid levels (None: automatic)
    file_budget_s: float | None = None  # this file's time budget (s); None: no deadline (full quality)
    overwrite: bool = False  # redo even when a verified output exists
    fingerprint: dict[str, Any] = field(default_factory=dict)  # settings an output must have been made with
    run_token: str = ""  # the batch run that submitted it (set by run_batch; in its completion record)

    @property
    def name(self) -> str:
        return Path(self.source).name


def input_format(path: Path) -> str | None:
    """The registered format ``path`` is an input of ('tiff', 'ome-zarr', 'mha', ...), else None."""
    entry = formats.recognise(path)
    return None if entry is None else entry.name


def collect_inputs(inputs: Sequence[Path], ignored: list[dict[str, str]] | None = None) -> list[tuple[Path, str]]:
    """(path, format) of every input: named files and images, and the inputs of every registered format
    (:mod:`fusemycells.io.formats`: TIFF, OME-Zarr, the SimpleITK formats) directly inside named folders;
    the other entries of those folders are logged once and added to ``ignored`` ({file, reason}).

    Raises :class:`SetupError` for a path that does not exist or is neither an input nor a folder (a Zarr
    store without OME metadata is named as such).
    """
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw).resolve()
        if not path.exists():
            raise SetupError(f"input not found: {path}")
        kind = input_format(path)
        if kind is not None:
            found.append((path, kind))
        elif is_zarr_store(path):
            raise SetupError(f"{path} is {NOT_OME}")
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                child_kind = input_format(child)
                if child_kind is not None:
                    found.append((child, child_kind))
                    continue
                reason = not_input_reason(child, formats.chosen())
                log_not_read(str(child), reason, formats=formats.chosen())
                if ignored is not None:
                    ignored.append({"file": str(child), "reason": reason})
        else:
            raise SetupError(f"{unknown_reason(formats.chosen())} nor a folder: {path}")
    return found


def overwrite_problem(output_dir: Path, named: Sequence[Path], jobs: Sequence[Job]) -> str | None:
    """Why writing into ``output_dir`` would overwrite or mix with the inputs, or None.

    Refused: an output folder that is a named input folder or lies inside one or inside a Zarr
    store (input or the folder of one), and any output path that is an input's path.
    """
    out = Path(output_dir).resolve()
    for raw in named:
        path = Path(raw).resolve()
        if not path.is_dir() or not (out == path or path in out.parents):
            continue
        what = "Zarr store" if is_zarr_store(path) else "input folder"
        where = "is the" if out == path else "lies inside the"
        return f"--output {out} {where} {what} {path}: its outputs would overwrite or mix with the inputs"
    stores = [Path(j.source).resolve() for j in jobs if j.input_format == "ome-zarr"]
    for store in stores:
        if out == store or store in out.parents:
            return f"--output {out} lies inside the Zarr store {store}: its outputs would overwrite the input"
    sources = {Path(j.source).resolve(): j for j in jobs}
    for job in jobs:
        target = Path(job.output).resolve()
        if target in sources:
            return f"--output {out}: {job.name}'s output {target} would overwrite the input {sources[target].source}"
    return None


def output_name(source: Path, output_format: str) -> str:
    """Output file name: the input's when it is of ``output_format``, else its stem with that format's suffix
    ('a.ome.zarr' as TIFF: 'a.tif'; :func:`fusemycells.io.formats.output_name`)."""
    return formats.output_name(source.name, formats.get(output_format))


def plan_jobs(
    inputs: list[tuple[Path, str]], output_dir: Path, output_format: str = "auto", **options: Any
) -> list[Job]:
    """One :class:`Job` per input; ``output_format`` 'auto' keeps the input's format.

    ``options`` are the remaining :class:`Job` fields. Raises :class:`SetupError` when two inputs
    would write the same output.
    """
    jobs: list[Job] = []
    seen: dict[str, Path] = {}
    for path, kind in inputs:
        out_format = kind if output_format == "auto" else output_format
        name = output_name(path, out_format)
        if name in seen:
            raise SetupError(f"{path} and {seen[name]} would both be written to {output_dir / name}")
        seen[name] = path
        jobs.append(
            Job(source=str(path), output=str(output_dir / name), input_format=kind, output_format=out_format, **options)
        )
    return jobs


# --------------------------------------------------------------------------------------------
# Completion records: skip outputs that are verified complete


def record_path(output: Path) -> Path:
    """The completion record written next to an output (``<name>.done.json``)."""
    return output.with_name(output.name + RECORD_SUFFIX)


def _files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def content_digest(path: Path, chunk: int = 1 << 22) -> dict[str, Any]:
    """Bytes, file count and sha256 of a file, or of every file under a folder (relative names included, in sorted
    order).
    """
    digest = hashlib.sha256()
    total = 0
    files = _files_of(path)
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
                total += len(block)
    return {"bytes": total, "files": len(files), "sha256": digest.hexdigest()}


def input_stamp(path: Path) -> dict[str, int]:
    """Cheap identity of an input: total bytes, file count and newest modification time (ns)."""
    files = _files_of(path)
    stats = [f.stat() for f in files]
    return {
        "bytes": sum(s.st_size for s in stats),
        "files": len(files),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def write_record(job: Job, report: dict[str, Any]) -> dict[str, Any]:
    """Write the completion record of a finished output atomically; returns it."""
    output = Path(job.output)
    record = {
        "format": RECORD_FORMAT,
        "input": {"path": job.source, **input_stamp(Path(job.source))},
        "output": {"path": output.name, **content_digest(output)},
        "fingerprint": job.fingerprint,
        "shape": report.get("shape"),
        "degradation": report.get("degradation"),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_token": job.run_token,
        "entry": report,  # the file's report entry, for a retry of this run whose result was lost with its worker
    }
    path = record_path(output)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


def verify_complete(job: Job) -> tuple[bool, str]:
    """(complete, why): the output exists and matches its completion record, made from this input with these settings.

    Reads the whole output once (sha256); anything missing or different means not complete.
    """
    output = Path(job.output)
    path = record_path(output)
    if not path.is_file():
        return False, "no completion record"
    if not output.exists():
        return False, "completion record without output"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _ignored_record(job, f"unreadable completion record ({exc})")
    problem = record_shape_problem(record)
    if problem is not None:
        return _ignored_record(job, f"completion record of the wrong shape ({problem})")
    if record.get("format") != RECORD_FORMAT:
        return False, f"completion record format {record.get('format')!r}"
    if record.get("fingerprint") != job.fingerprint:
        return False, "made with other settings or weights"
    stamp = {k: v for k, v in record.get("input", {}).items() if k != "path"}
    if stamp != input_stamp(Path(job.source)):
        return False, "input changed since"
    expected = record.get("output", {})
    sizes = input_stamp(output)
    if sizes["bytes"] != expected.get("bytes") or sizes["files"] != expected.get("files"):
        return False, "output size differs from its record"
    actual = content_digest(output)
    if actual["sha256"] != expected.get("sha256"):
        return False, "output checksum differs from its record"
    return True, f"verified complete (sha256 {actual['sha256'][:12]})"


def record_shape_problem(record: Any) -> str | None:
    """What is wrong with the layout of a parsed completion record (None: an object with the keys
    :func:`verify_complete` reads, of the right types)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("input", "output", "fingerprint"):
        if not isinstance(record.get(key), dict):
            return f"{key!r} is {type(record.get(key)).__name__}, not an object"
    return None


def _ignored_record(job: Job, why: str) -> tuple[bool, str]:
    """(False, why), with a warning: a garbled record is ignored and the file redone."""
    log.warning("[%s] %s: ignored, the file is fused again", job.name, why)
    return False, why


# --------------------------------------------------------------------------------------------
# The worker's Fuser and the one file-to-file path (fusemycells.files), imported on the workers only


def _make_fuser(settings: WorkerSettings) -> Fuser:
    """A ``pipeline.Fuser`` with its own ``BudgetPolicy`` (no run-wide deadline: files get their own)."""
    from fusemycells.config import load_manifest
    from fusemycells.pipeline import Fuser
    from fusemycells.runtime import allocator
    from fusemycells.runtime.budget import BudgetPolicy

    allocator.configure()  # this worker process's malloc and numpy settings, as inference.py's
    manifest = load_manifest(Path(settings.resources))
    policy = BudgetPolicy.create(
        settings.device, settings.vram_budget_gib, None, settings.threads, settings.ram_budget_gib
    )
    # workers share the client's terminal: no patch bars there (the client shows the files' bar)
    return Fuser(manifest, policy, backend=settings.backend, progress=log_lines_only)


def fuse_job(job: Job, fuser: Fuser, deadline: float | None) -> dict[str, Any]:
    """Read, fuse and write one job with :func:`fusemycells.files.process_file`, as ``inference.py`` does a
    file: its report entry (status ok, fallback_identity or refused)."""
    from fusemycells.files import Conversion, process_file
    from fusemycells.io.volume import WriteOptions

    how = Conversion(
        input_format=job.input_format,
        output_format=job.output_format,
        output_name=Path(job.output).name,
        channel=job.channel,
        level=job.level,
        channel_index=job.channel_index,
        write=WriteOptions(levels=job.zarr_levels, source=job.name, fingerprint=job.fingerprint),
    )
    report = process_file(Path(job.source), Path(job.output).parent, fuser, job.output_dtype, deadline, how)
    return case_entry(report)


# --------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs to build its Fuser (sent to each worker with the plugin)."""

    resources: str
    device: str = "auto"
    backend: str = "auto"
    threads: int | None = None  # CPU threads of the networks per worker (None: the worker's cores)
    vram_budget_gib: float | None = None
    ram_budget_gib: float | None = None  # per worker (None: 85 % of what the worker's host has free)
    log_level: int = logging.WARNING


class FuserPlugin(WorkerPlugin):
    """Builds one ``Fuser`` per worker process when the worker starts; its networks load once, on first use, and stay.
    """

    name = PLUGIN_NAME

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.fuser: Fuser | None = None

    def setup(self, worker: Any) -> None:
        package_log = logging.getLogger("fusemycells")
        package_log.setLevel(self.settings.log_level)
        if not package_log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s {worker.name} %(levelname)-7s %(message)s", "%H:%M:%S")
            )
            package_log.addHandler(handler)
        require_torch(f" (on worker {worker.name})")
        self.fuser = _make_fuser(self.settings)



FileHook = Callable[[str], None]
"""Called on the worker with the input's file name before a file is processed (tests: slow one file down)."""


def worker_fuser() -> Fuser:
    """The Fuser of the worker running the current task (built by :class:`FuserPlugin`)."""
    from distributed import get_worker

    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.fuser is None:
        raise RuntimeError(f"worker has no {PLUGIN_NAME} plugin: register FuserPlugin before submitting jobs")
    return plugin.fuser


def run_job(job: Job, before_file: FileHook | None = None, fuser: Fuser | None = None) -> dict[str, Any]:
    """Fuse one job on a worker and return its report entry (never raises for a problem with the file).

    Skips the job when its output verifies complete (unless ``job.overwrite``). ``fuser``: the
    worker's own (:func:`worker_fuser`) when None.
    """
    started = time.perf_counter()
    where = _where()
    if not job.overwrite:
        complete, why = verify_complete(job)
        recovered = recovered_entry(job) if complete else None
        if recovered is not None:
            return recovered
        if complete:
            return {
                "file": job.name,
                "status": "skipped",
                "reason": why,
                "input": job.source,
                "output": job.output,
                **where,
            }
    if before_file is not None:
        before_file(job.name)
    if fuser is None:
        fuser = worker_fuser()
    replacing = os.path.lexists(job.output)
    deadline = None if job.file_budget_s is None else time.perf_counter() + job.file_budget_s
    report = fuse_job(job, fuser, deadline)
    report.update({"input": job.source, "output": job.output, **where})
    report["replaced"] = replacing and report["status"] == "ok"
    report.setdefault("seconds", {})["job"] = round(time.perf_counter() - started, 3)
    if report["status"] == "ok":
        try:
            report["record"] = write_record(job, report)["output"]
        except OSError as exc:
            report["status"], report["error"] = "refused", f"{job.name}: completion record not written: {exc}"
    return report


def recovered_entry(job: Job) -> dict[str, Any] | None:
    """The report entry of a verified-complete output written by this same batch run (its completion
    record has the job's ``run_token``), marked ``recovered``; None otherwise.

    Dask recomputes a finished task whose result was held by a worker that died; the retry then finds
    the output it wrote complete. It was written in this run, so it is reported as written (``ok``).
    """
    if not job.run_token:
        return None
    try:
        record = json.loads(record_path(Path(job.output)).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    entry = record.get("entry")
    if record.get("run_token") != job.run_token or not isinstance(entry, dict) or entry.get("status") != "ok":
        return None
    lost = "written earlier in this run by a worker that was lost before its result was gathered"
    return {**entry, "recovered": lost}


def _where() -> dict[str, Any]:
    """Which worker process runs this (address, pid, its CUDA_VISIBLE_DEVICES)."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except (ImportError, ValueError):
        address = None
    return {"worker": address, "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


# --------------------------------------------------------------------------------------------
# Client side


def visible_gpus(device: str) -> list[str]:
    """CUDA device ids the local workers may use: none for ``--device cpu``, else CUDA_VISIBLE_DEVICES or every device
    torch counts.
    """
    if device == "cpu":
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def default_workers(gpus: int, cores: int) -> int:
    """Local workers when ``--workers`` is not given: one per GPU; else 2 (1 on one core).

    On the 2-core development machine, 8 stacks took 220–249 s on 2 single-thread workers against
    249–302 s for ``inference.py`` (2 threads, one file at a time) and 358 s for one 2-thread worker
    (README, *Scale-out*). More CPU workers each hold a whole stack in memory and share the RAM
    budget, so larger machines get ``--workers`` by choice, not by default.
    """
    return gpus if gpus else min(2, max(1, cores))


def worker_specs(
    workers: int, threads: int, gpus: Sequence[str], memory_limit: int | str, silence_logs: int = logging.WARNING
) -> dict[str, dict[str, Any]]:
    """Local worker specs: one single-task Nanny process each, GPU ``gpus[i % len(gpus)]`` (CUDA_VISIBLE_DEVICES),
    ``threads`` CPU threads.
    """
    from distributed import Nanny

    specs = {}
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MALLOC_ARENA_MAX": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        options = {
            "nthreads": 1,
            "memory_limit": memory_limit,
            "env": env,
            "name": f"fusemycells-{i}",
            "dashboard": False,
            "silence_logs": silence_logs,
        }
        specs[f"fusemycells-{i}"] = {"cls": Nanny, "options": options}
    return specs


def dashboard_link(address: str, client: Any) -> str:
    """The dashboard's link: the host of ``--dashboard`` (the scheduler's host when it names none,
    as in ``:8787``) and the port the dashboard really listens on (``:0`` picks a free one)."""
    from urllib.parse import urlsplit

    default = urlsplit(client.dashboard_link)
    host = address.rsplit(":", 1)[0] if ":" in address else address
    port = client.scheduler_info().get("services", {}).get("dashboard", default.port)
    return f"{default.scheme}://{host or default.hostname}:{port}/status"


def start_local_cluster(workers: int, threads: int, gpus: Sequence[str], dashboard: str | None = None) -> Any:
    """A local cluster of ``workers`` processes (dask's SpecCluster, as LocalCluster, but with one environment per
    worker for its GPU).
    """
    from distributed import Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    # without a dashboard the scheduler's HTTP routes take a free port (not 8787, perhaps another cluster's)
    address = dashboard if dashboard is not None else ":0"
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": address, "dashboard": dashboard is not None}}
    specs = worker_specs(workers, threads, gpus, int(MEMORY_LIMIT / workers))
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING, name="fusemycells")


class Progress:
    """Files done: a bar with the estimated time left on a terminal (:func:`fusemycells.runtime.progress.interactive`),
    one log line per finished file otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        stream = sys.stderr if stream is None else stream
        self.total = total
        self.counts: dict[str, int] = {"ok": 0, "skipped": 0, "refused": 0}
        self.started = time.perf_counter()
        self.bar = Bar(total, "files", stream) if interactive(stream) else None

    def update(self, entry: dict[str, Any]) -> None:
        self.counts[entry["status"]] = self.counts.get(entry["status"], 0) + 1
        done = sum(self.counts.values())
        elapsed = time.perf_counter() - self.started
        counts = self.counts
        outcomes = f"{counts['ok']} written, {counts['skipped']} skipped, {counts['refused']} refused"
        if self.bar is not None:
            self.bar.update(done, elapsed, outcomes)
            if done == self.total:
                self.close()
        else:
            summary = f"{done}/{self.total} files ({outcomes}) {elapsed:.0f} s"
            log.info("%s %s: %s", entry["status"], entry["file"], summary)

    def close(self) -> None:
        """Close the bar (its last state stays on the terminal); nothing to do without one."""
        if self.bar is not None:
            self.bar.close()


def run_batch(
    client: Any,
    jobs: Sequence[Job],
    before_file: FileHook | None = None,
    progress: Progress | None = None,
    finished: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Submit every job (largest input first), gather their report entries in input order.

    A job whose worker died more often than the scheduler allows (``KilledWorker``) or whose task
    failed outside the pipeline is reported as refused; the others carry on. Each entry gets
    ``retries``: its attempts lost with their worker. ``finished`` gets each entry as it arrives
    (what a run stopped by a signal reports).
    """
    token = uuid.uuid4().hex[:8]
    order = sorted(range(len(jobs)), key=lambda i: -input_stamp(Path(jobs[i].source))["bytes"])
    futures = {}
    for i in order:
        job = replace(jobs[i], run_token=token)
        future = client.submit(run_job, job, before_file, key=f"fuse-{job.name}-{token}", pure=False)
        futures[future] = i
    entries: list[dict[str, Any] | None] = [None] * len(jobs)
    try:
        _gather(client, futures, jobs, entries, progress, finished)
    finally:
        if progress is not None:
            progress.close()
    return [e for e in entries if e is not None]


def _gather(
    client: Any,
    futures: dict[Any, int],
    jobs: Sequence[Job],
    entries: list[Any],
    progress: Progress | None,
    finished: list[dict[str, Any]] | None,
) -> None:
    """Each job's report entry into ``entries`` (by job index) as its future completes."""
    from distributed import as_completed

    for future in as_completed(list(futures)):
        job = jobs[futures[future]]
        try:
            entry = future.result()
        except Exception as exc:
            entry = {
                "file": job.name,
                "status": "refused",
                "error": f"{job.name}: {type(exc).__name__}: {exc}",
                "input": job.source,
                "output": job.output,
            }
            log.error("[%s] refused: %s", job.name, entry["error"])
        retries = task_retries(client, future.key)
        if retries is not None:
            entry["retries"] = retries
            if retries:
                log.warning("[%s] %d attempt(s) lost with their worker before this one", job.name, retries)
        if entry.get("replaced"):
            log.info("[%s] replaced the existing output %s", job.name, job.output)
        entries[futures[future]] = entry
        if finished is not None:
            finished.append(entry)
        if progress is not None:
            progress.update(entry)
        future.release()


def task_retries(client: Any, key: Any) -> int | None:
    """How many attempts at task ``key`` were lost with their worker (the scheduler's ``suspicious``
    count); None when the scheduler cannot tell."""

    def suspicious(dask_scheduler: Any, key: Any) -> int | None:  # runs on the scheduler (pickled by value)
        task = dask_scheduler.tasks.get(key)
        return None if task is None else int(task.suspicious)

    try:
        return client.run_on_scheduler(suspicious, key=key)
    except Exception as exc:  # a report detail: never lose the file's entry for it
        log.debug("retries of %s unknown: %s", key, exc)
        return None


def workers_lost(client: Any) -> int:
    """Workers the scheduler has lost so far (removed without being asked to close: killed, out of
    memory); a local cluster's nanny restarts each."""
    events = client.get_events("all")
    return sum(
        1
        for _, event in events
        if isinstance(event, dict) and event.get("action") == "remove-worker" and not event.get("expected")
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("fusemycells.batch"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("inputs", nargs="+", type=Path, metavar="INPUT",
        help="files (TIFF, .mha/.mhd/.nrrd/.nii/.nii.gz), OME-Zarr images, folders of them")
    add("--output", type=Path, required=True, help="output folder (created)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of a running dask scheduler (e.g. tcp://host:8786); default: a local cluster")
    where.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default: one per visible GPU; on CPUs 2, each with half the "
                       "cores)")
    add("--threads", type=int, default=None,
        help="CPU threads of the networks per worker (local default: cores / workers; remote: the worker's cores)")
    add("--resources", type=Path, default=None, help="weights folder with manifest.json (as inference.py)")
    add("--device", choices=["auto", "cuda", "cpu"], default="auto")
    add("--backend", choices=["auto", *BACKENDS], default="auto")
    add("--output-dtype", choices=["uint16", "float32"], default="uint16")
    add("--output-format", choices=["auto", *formats.names()], default="auto",
        help="auto: like the input (TIFF → TIFF, OME-Zarr → OME-Zarr, .mha → .mha, ...)")
    add("--level", type=int, default=0, help="OME-Zarr input: resolution level to fuse (default 0, full resolution)")
    add("--channel", choices=["nucleus", "membrane"], default=None,
        help="force the channel (default: from each input's metadata)")
    add("--channel-index", type=int, default=None, metavar="N",
        help="OME-Zarr input with a c axis of several channels: fuse channel N (0-based; default: refuse such images)")
    add("--zarr-levels", type=int, default=None,
        help="OME-Zarr output: pyramid levels (default: halve Y/X down to ~128 px, at most 5)")
    add("--time-budget", type=float, default=None, metavar="SECONDS",
        help="per-file deadline; outputs degrade in steps to meet it (default: none)")
    add("--ram-budget", type=float, default=None, metavar="GiB",
        help="host memory one worker's file may need (local default: 85%% of available / workers)")
    add("--vram-budget", type=float, default=None, metavar="GiB", help="GPU memory budget per worker")
    add("--overwrite", action="store_true", help="redo outputs even when they verify complete")
    add("--dashboard", default=None, metavar="ADDRESS",
        help="serve the local cluster's dashboard here (e.g. :8787; default off)")
    add("--report", type=Path, default=None, help="write the gathered JSON report here")
    add("-v", "--verbose", action="store_true", help="debug logging here, per-file INFO logging on the workers")
    return parser.parse_args(argv)


def _available_ram_gib() -> float:
    """Memory available to new processes here (GiB): psutil's estimate, capped by dask's view of this host's limit
    (cgroups).
    """
    import psutil
    from distributed.system import MEMORY_LIMIT

    return min(psutil.virtual_memory().available, MEMORY_LIMIT) / (1 << 30)


@dataclass
class BatchRun:
    """What a batch run has done so far, kept by :func:`main` so that a stopped run can report it."""

    args: argparse.Namespace
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)  # where this run's temporary files start
    known: dict[str, Any] = field(default_factory=dict)  # what the report says besides the files
    ignored: list[dict[str, str]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)  # entries gathered so far
    output_dir: Path | None = None
    client: Any = None
    cluster: Any = None  # the local cluster this run started (None: --scheduler)
    lost_before: int | None = None
    order: dict[str, int] = field(default_factory=dict)  # input path → job index (the report's order)

    def report(self, exit_code: int, entries: Sequence[dict[str, Any]] = (), **extra: Any) -> dict[str, Any]:
        """The gathered report (see :func:`fusemycells.report.batch_report`)."""
        return batch_report(
            inputs=[str(p) for p in self.args.inputs],
            output_dir=str(self.args.output),
            exit_code=exit_code,
            seconds=time.perf_counter() - self.started,
            entries=entries,
            ignored=self.ignored,
            stale_partials_removed=self.stale,
            **self.known,
            **extra,
        )

    def count_lost_workers(self) -> None:
        """Put the workers lost since the jobs were submitted into the report's ``cluster``."""
        cluster = self.known.get("cluster")
        if self.client is None or cluster is None or self.lost_before is None:
            return
        try:
            cluster["workers_lost"] = workers_lost(self.client) - self.lost_before
        except Exception as exc:  # a report detail
            log.debug("lost workers unknown: %s", exc)


def main(argv: Sequence[str] | None = None, before_file: FileHook | None = None) -> int:
    """Run the command; ``before_file``: a worker-side test hook (see :data:`FileHook`)."""
    args = parse_args(argv)
    configure_logging(args.verbose)
    problem = report_path_problem(args.report)  # before any work, as inference.py
    if problem is not None:
        log.error("%s", problem)
        return 2
    run = BatchRun(args)
    return run_stoppable(lambda: _run(run, before_file), lambda stopped: _report_stop(run, stopped))


def _run(run: BatchRun, before_file: FileHook | None) -> int:
    args = run.args
    try:
        distributed = require_distributed()
        if not args.scheduler:
            require_torch()  # the local workers share this environment
        jobs, resources = plan_run(run)
        settings = start_cluster(run, distributed, resources)
        run.client.register_plugin(FuserPlugin(settings), name=PLUGIN_NAME)
        cluster_info = run.known["cluster"]
        cluster_info["workers"] = len(run.client.scheduler_info(n_workers=-1).get("workers", {}))
        cluster_info["threads_per_worker"] = settings.threads
        run.known.update({"jobs": len(jobs), "settings": asdict(settings)})
        log.info("%d input(s) on %d worker(s) (%s)", len(jobs), cluster_info["workers"], cluster_info["scheduler"])
        run.lost_before = workers_lost(run.client)
        entries = run_batch(run.client, jobs, before_file, progress=Progress(len(jobs)), finished=run.finished)
        run.count_lost_workers()
    except (SetupError, MissingDependency, OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        _close(run.client, run.cluster)
        _write_report(args.report, run.report(2, error=str(exc)))
        return 2
    _close(run.client, run.cluster)
    return _finish(run, entries)


def plan_run(run: BatchRun) -> tuple[list[Job], Path]:
    """The run's jobs and weights folder, after the checks that need no cluster: inputs found, the packages of
    their formats installed, the manifest valid, an output folder that is no input's and is writable (stale
    temporary files of a killed run removed). Raises :class:`SetupError` (exit 2)."""
    from fusemycells.config import ManifestError, load_manifest, resolve_resources_dir

    args = run.args
    inputs = collect_inputs(args.inputs, run.ignored)
    if not inputs:
        raise SetupError(f"no inputs ({'/'.join(formats.names())}) in {', '.join(map(str, args.inputs))}")
    used = {kind for _, kind in inputs} | ({args.output_format} - {"auto"})
    for entry in formats.chosen(sorted(used)):
        if entry.require is not None:
            entry.require()
    resources, why = resolve_resources_dir(args.resources)
    log.info("weights from %s (%s)", resources, why)
    try:
        load_manifest(resources)
    except ManifestError as exc:
        raise SetupError(str(exc)) from exc
    output_dir = args.output.resolve()
    options = {k: getattr(args, k) for k in ("level", "channel", "channel_index", "zarr_levels")}
    fingerprint = {"weights": manifest_sha256(resources), "backend": args.backend, "output_dtype": args.output_dtype}
    fingerprint.update({**options, "time_budget_s": args.time_budget})
    jobs = plan_jobs(inputs, output_dir, args.output_format, output_dtype=args.output_dtype,
                     file_budget_s=args.time_budget, fingerprint=fingerprint, overwrite=args.overwrite, **options)
    run.order = {job.source: i for i, job in enumerate(jobs)}
    problem = overwrite_problem(output_dir, args.inputs, jobs)
    if problem is not None:
        raise SetupError(problem)
    try:
        ensure_writable(output_dir)
    except PermissionError as exc:
        raise SetupError(str(exc)) from exc
    run.output_dir = output_dir
    run.stale = note_stale_partials(output_dir, run.started_wall, PARTIAL_PATTERNS)
    run.known.update({"resources": str(resources), "manifest_sha256": fingerprint["weights"]})
    run.known["fingerprint"] = fingerprint
    return jobs, resources


def start_cluster(run: BatchRun, distributed: Any, resources: Path) -> WorkerSettings:
    """Connect to ``--scheduler`` or start a local cluster (``run.client``, ``run.cluster``, the report's
    ``cluster``); the settings every worker builds its Fuser from."""
    args = run.args
    threads, ram_gib = args.threads, args.ram_budget
    if args.scheduler:
        run.client = distributed.Client(args.scheduler, timeout="20s")
        cluster_info: dict[str, Any] = {"scheduler": args.scheduler}
    else:
        gpus = visible_gpus(args.device)
        workers = args.workers or default_workers(len(gpus), os.cpu_count() or 1)
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        if ram_gib is None:
            ram_gib = round(0.85 * _available_ram_gib() / workers, 2)
        if args.dashboard and importlib.util.find_spec("bokeh") is None:
            log.warning("--dashboard needs bokeh: %s", INSTALL_HINT)
        run.cluster = start_local_cluster(workers, threads, gpus, args.dashboard)
        run.client = distributed.Client(run.cluster)
        link = dashboard_link(args.dashboard, run.client) if args.dashboard else None
        cluster_info = {"scheduler": run.cluster.scheduler_address, "local_workers": workers, "gpus": gpus}
        cluster_info["dashboard"] = link
        if link:
            log.info("dashboard at %s", link)
    run.known["cluster"] = cluster_info
    level = logging.INFO if args.verbose else logging.WARNING
    return WorkerSettings(str(resources), args.device, args.backend, threads, args.vram_budget, ram_gib, level)


def _finish(run: BatchRun, entries: list[dict[str, Any]]) -> int:
    """Write the gathered report and log the closing line; the exit code (0 all written or verified, 1 some
    refused, 2 the report could not be written)."""
    refused = [e["file"] for e in entries if e["status"] not in (*WRITTEN_STATUSES, "skipped")]
    exit_code = 1 if refused else 0
    report = run.report(exit_code, entries)
    if not _write_report(run.args.report, report):
        return 2
    log.info(
        "done: %d written, %d skipped (verified complete), %d refused, %.1f s",
        report["written"],
        report["skipped"],
        len(refused),
        report["seconds"],
    )
    return exit_code


def _report_stop(run: BatchRun, stopped: Stopped) -> int:
    """Stop the local workers, remove the temporary files of the files in progress, write the report
    of what was finished, log one line; the signal's exit code (143 SIGTERM, 130 SIGINT).

    With ``--scheduler`` the remote workers are not ours to stop: a file in progress there is
    written (atomically) or not, as its worker goes on.
    """
    run.count_lost_workers()
    # stopping on purpose: no warnings of cancelled tasks, nor the nanny's teardown errors (with a traceback) when
    # the same Ctrl-C reached the worker processes of the group and they exit while the cluster closes
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    _close(run.client, run.cluster)
    removed: list[str] = []
    if run.cluster is not None and run.output_dir is not None:  # its workers are gone: their partials are orphans
        removed = remove_partials(run.output_dir, since=run.started_wall, patterns=PARTIAL_PATTERNS)
    entries = sorted(run.finished, key=lambda e: run.order.get(str(e.get("input")), len(run.order)))
    written = sum(e.get("status") in WRITTEN_STATUSES for e in entries)
    log.error(
        "%s: stopping; %d output(s) written before it, the files in progress were not written "
        "(%d temporary file(s) removed)",
        stopped,
        written,
        len(removed),
    )
    _write_report(run.args.report, run.report(stopped.exit_code, entries, error=str(stopped), **stop_flags(stopped)))
    return stopped.exit_code


def _close(client: Any, cluster: Any) -> None:
    for thing in (client, cluster):
        if thing is not None:
            try:
                thing.close()
            except Exception as exc:  # closing must not hide the run's own result
                log.debug("closing %s: %s", type(thing).__name__, exc)


def _write_report(path: Path | None, report: dict[str, Any]) -> bool:
    """Write the gathered report if one was asked for; False (logged) when it could not be written."""
    problem = None if path is None else write_report(path, report)
    if problem is not None:
        log.error("%s", problem)
    return problem is None


if __name__ == "__main__":
    # run the importable module's main, so that pickled classes and functions are
    # ``fusemycells.batch.*`` on the workers, not ``__main__.*``
    from fusemycells.batch import main as _main

    sys.exit(_main())
