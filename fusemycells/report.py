"""The JSON reports: one file's entry (:class:`CaseReport`), the run report of ``inference.py --report``
and the gathered report of ``python -m fusemycells.batch --report``, assembled here so that both say
the same things the same way.

Every key, its type and its unit are documented in ``report.schema.json`` next to this module
(JSON Schema 2020-12; the tests validate real reports against it, and it travels with the package
into the image). Each report also carries a ``units`` block (:func:`units_block`) for the numeric
keys whose name does not end in a unit. Nothing here imports the pipeline's heavy modules: the
CLI builds its report with this module before (and whether or not) torch is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusemycells import __version__

SCHEMA_VERSION = 2
"""Layout version of both reports (``schema_version``): raised when a key is renamed or removed or its
meaning changes; a key added to the schema does not change it."""
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
"""The JSON Schema of both reports: the documentation of every key."""
WRITTEN_STATUSES = ("ok", "fallback_identity")
"""A file entry's statuses that mean its output was written (the process may exit 0)."""
RUN_PROGRAM = "inference.py"
BATCH_PROGRAM = "fusemycells.batch"

UNIT_SUFFIXES = {
    "_s": "seconds (wall clock)",
    "_mib": "MiB (2^20 bytes)",
    "_gib": "GiB (2^30 bytes)",
    "_um": "micrometres (µm)",
}
"""Units named by a key's ending; it holds for every number under such a key (``phases_s``)."""

CASE_UNITS = {
    "shape": "voxels of the input stack, (Z, Y, X)",
    "high_res_grid": "voxels of the high-resolution grid H (the channel's target spacing), (Z, Y, X)",
    "seconds": "seconds (wall clock) per phase of this file",
    "non_finite_replaced": "voxels",
    "out_of_range_clipped": "voxels",
    "degradation": "level 0 to 3, named in degradation_name",
    "weight_map": "fraction (0 to 1) of the weight map's cells whose blend weight exceeds the key's threshold",
    "adaptive.relative_noise": "noise σ divided by the input's 2 to 99.8 percentile range (dimensionless)",
    "adaptive.output_sigma": "voxels of the input grid (X; the manifest's output Gaussian σ)",
    "adaptive.output_sigma_zyx": "voxels of the input grid, (Z, Y, X)",
    "adaptive.network_gate": "factor 0 to 1 on the networks' correction",
    "trust.factor": "factor 0 to 1 on the networks' correction (per-case trust)",
    "trust.signals": "dimensionless ratios and correlations (fusemycells.trust)",
    "trust.rules": "factor 0 to 1 per rule",
    "trust.seconds": "seconds (wall clock) per part of the trust decision",
    "trust.region_mean": "factor 0 to 1: mean of the region factor (agreement map) over the diff grid",
    "trust.region_below_half": "fraction (0 to 1) of the diff grid's cells whose region factor is below 0.5",
    "stages.patch.patches": "patches (network inputs of patch_size voxels on H)",
    "stages.patch.patch_grid": "patches per axis, (Z, Y, X)",
    "stages.patch.overlap": "fraction of the patch size shared by neighbouring patches",
    "stages.patch.batch_size": "patches per forward call",
    "stages.patch.workers": "forward calls run side by side",
    "stages.patch.sub_patch": "voxels of H, (Z, Y, X)",
}
"""Units of a file entry's numeric keys whose name does not end in a unit (paths below the entry)."""

RUN_UNITS = {
    "schema_version": "layout version of this report",
    "exit_code": "process exit status",
    "counts": "files",
    "seconds": "seconds (wall clock) from the clock's start to the report",
    "policy.threads": "CPU threads",
    **{f"files[].{path}": unit for path, unit in CASE_UNITS.items()},
}
BATCH_UNITS = {
    "schema_version": "layout version of this report",
    "exit_code": "process exit status",
    "counts": "files",
    "written": "files",
    "skipped": "files",
    "seconds": "seconds (wall clock) of the whole batch command",
    "cluster.local_workers": "worker processes",
    "cluster.workers": "worker processes",
    "cluster.threads_per_worker": "CPU threads",
    "cluster.workers_lost": "worker processes",
    "settings.threads": "CPU threads per worker",
    "settings.log_level": "Python logging level of the workers (10 DEBUG, 20 INFO, 30 WARNING)",
    "fingerprint.level": "OME-Zarr resolution level (0: full resolution)",
    "fingerprint.zarr_levels": "OME-Zarr pyramid levels",
    "files[].pid": "process id",
    "files[].retries": "attempts lost with their worker",
    "files[].record.bytes": "bytes",
    "files[].record.files": "files",
    **{f"files[].{path}": unit for path, unit in CASE_UNITS.items()},
}


def units_block(keys: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """A report's ``units``: the key endings that name a unit, and the unit of every other numeric key
    by its path (``files[].shape``: the ``shape`` of every ``files`` entry; a unit holds for every
    number under its key)."""
    return {"suffixes": dict(UNIT_SUFFIXES), "keys": dict(keys)}


@dataclass
class CaseReport:
    """What happened to one input file (one entry of a report's ``files``; see :func:`case_entry`)."""

    file: str
    status: str = "pending"  # ok | fallback_identity (the normalised input written as the last resort) | refused
    shape: list[int] | None = None
    spacing_um: list[float] | None = None
    channel: str | None = None
    input_dtype: str | None = None
    output_dtype: str | None = None
    high_res_grid: list[int] | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, Any] = field(default_factory=dict)  # per phase; "profile_s": per kind of work (timing.SECTIONS)
    peak_rss_mib: float | None = None
    peak_vram_mib: float | None = None  # torch's reserved CUDA memory; None on a CPU run
    non_finite_replaced: int = 0
    out_of_range_clipped: int = 0  # finite input values outside preprocess.safe_range, clipped to it
    degradation: int = 0  # see fusemycells.runtime.ladder.DEGRADATION_LEVELS
    weight_map: dict[str, float] = field(default_factory=dict)
    adaptive: dict[str, float] = field(default_factory=dict)  # relative noise → output σ, network gate
    trust: dict[str, Any] = field(default_factory=dict)  # per-case trust: factor, signals, cost (fusemycells.trust)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    device_fault: dict[str, str] | None = None  # the device's fault while this file ran: step, error, rerun_on


def degradation_name(level: int) -> str:
    """What a degradation level means (``fusemycells.runtime.ladder.DEGRADATION_LEVELS``)."""
    from fusemycells.runtime.ladder import DEGRADATION_LEVELS  # numpy: only once a file was processed

    return DEGRADATION_LEVELS[level]


def case_entry(case: CaseReport) -> dict[str, Any]:
    """A file's report entry: the :class:`CaseReport`'s fields, with ``degradation_name`` after ``degradation``."""
    entry: dict[str, Any] = {}
    for key, value in asdict(case).items():
        entry[key] = value
        if key == "degradation":
            entry["degradation_name"] = degradation_name(value)
    return entry


def manifest_sha256(resources: Path) -> str:
    """sha256 of ``resources/manifest.json``, which lists every weight file's sha256: one checksum
    that names the weights (and the settings in the manifest) a run used."""
    from fusemycells.config import sha256_of

    return sha256_of(Path(resources) / "manifest.json")


def file_counts(entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Files per ``status`` of the report entries: written (ok, fallback_identity), refused, skipped (batch:
    verified complete)."""
    statuses = [entry.get("status") for entry in entries]
    return {
        "written": sum(s in WRITTEN_STATUSES for s in statuses),
        "refused": sum(s not in (*WRITTEN_STATUSES, "skipped") for s in statuses),
        "skipped": statuses.count("skipped"),
    }


@dataclass
class RunFacts:
    """What ``inference.py`` learns about its run as it goes: what its report is assembled from."""

    input_dir: str
    output_dir: str
    inputs: int = 0  # TIFF files found in the input folder
    resources: str | None = None  # the weights folder used
    manifest_sha256: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # {file, reason}: entries of the input folder not read
    stale_partials_removed: list[str] = field(default_factory=list)


def run_report(
    facts: RunFacts,
    *,
    exit_code: int,
    cases: Sequence[Mapping[str, Any]],
    clock: Mapping[str, Any],
    policy: Mapping[str, Any] | None = None,
    error: str | None = None,
    terminated: bool = False,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The report of ``inference.py --report`` (every key always present; see ``report.schema.json``).

    ``cases``: the entries of the files done (:func:`case_entry`), in order; ``clock``: the time
    account (:func:`fusemycells.runtime.deadline.time_account`); ``policy``: the budget policy's report,
    None when the run stopped before it was made.
    """
    written = [str(c["file"]) for c in cases if c.get("status") in WRITTEN_STATUSES]
    refused = [str(c["file"]) for c in cases if c.get("status") not in WRITTEN_STATUSES]
    return {
        "schema_version": SCHEMA_VERSION,
        "program": RUN_PROGRAM,
        "fusemycells_version": __version__,
        "exit_code": exit_code,
        "error": error,
        "terminated": terminated,
        "interrupted": interrupted,
        "counts": {
            "inputs": facts.inputs,
            "written": len(written),
            "refused": len(refused),
            "unfinished": max(facts.inputs - len(written) - len(refused), 0),
            "skipped": len(facts.skipped),
        },
        "input_dir": facts.input_dir,
        "output_dir": facts.output_dir,
        "resources": facts.resources,
        "manifest_sha256": facts.manifest_sha256,
        "policy": None if policy is None else dict(policy),
        "clock": dict(clock),
        "seconds": clock["elapsed_s"],
        "written": written,
        "refused": refused,
        "skipped": list(facts.skipped),
        "stale_partials_removed": list(facts.stale_partials_removed),
        "files": [dict(c) for c in cases],
        "units": units_block(RUN_UNITS),
    }


def batch_report(
    *,
    inputs: Sequence[str],
    output_dir: str,
    exit_code: int,
    seconds: float,
    entries: Sequence[Mapping[str, Any]] = (),
    jobs: int = 0,
    error: str | None = None,
    resources: str | None = None,
    manifest_sha256: str | None = None,
    cluster: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    ignored: Sequence[Mapping[str, str]] = (),
    stale_partials_removed: Sequence[str] = (),
    terminated: bool = False,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The gathered report of ``python -m fusemycells.batch --report`` (every key always present).

    ``inputs``: the paths given on the command line; ``jobs``: the input files and images found in
    them; ``entries``: one per job, in input order (a :func:`case_entry` with the batch's keys, or a
    skipped / refused entry; a stopped run: the jobs finished); ``ignored``: the entries of the
    input folders that are not inputs ({file, reason}); the rest is None when the run stopped before
    it was known.
    """
    counts = file_counts(entries)
    return {
        "schema_version": SCHEMA_VERSION,
        "program": BATCH_PROGRAM,
        "fusemycells_version": __version__,
        "exit_code": exit_code,
        "error": error,
        "terminated": terminated,
        "interrupted": interrupted,
        "counts": {"inputs": jobs, **counts},
        "inputs": [str(p) for p in inputs],
        "output_dir": output_dir,
        "resources": resources,
        "manifest_sha256": manifest_sha256,
        "cluster": None if cluster is None else dict(cluster),
        "settings": None if settings is None else dict(settings),
        "fingerprint": None if fingerprint is None else dict(fingerprint),
        "seconds": round(seconds, 3),
        "written": counts["written"],
        "skipped": counts["skipped"],
        "refused": [str(e["file"]) for e in entries if e.get("status") not in (*WRITTEN_STATUSES, "skipped")],
        "ignored": [dict(e) for e in ignored],
        "stale_partials_removed": list(stale_partials_removed),
        "files": [dict(e) for e in entries],
        "units": units_block(BATCH_UNITS),
    }


def write_report(path: Path, report: Mapping[str, Any]) -> str | None:
    """Write a report as indented JSON (its folder created); why it could not be written, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
    except OSError as exc:
        return f"report not written: {path} ({exc.strerror or exc})"
    return None
