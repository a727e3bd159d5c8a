"""Run configuration: one dataclass tree built from ``resources/manifest.json`` plus CLI flags.

The manifest (written by ``training/export.py``) describes, per channel, both stage networks
(file names, sha256, formats), the preprocessing and the post-processing parameters. Nothing in
``fusemycells`` reads the training code; the manifest is the whole contract.

Manifest schema (format_version 2; :func:`upgrade_manifest` reads version 1 too)::

    {
      "format_version": 2,
      "provenance": {...free text: how the weights were trained...},
      "time_budget_s": 480,           # optional; whole-run deadline from process start (null = none)
      "channels": {
        "nucleus": {
          "target_spacing_um": 0.6,
          "normalisation": {"kind": "percentile", "low": 1.0, "high": 99.8},
          "global_stage": {"in_channels": 1, "grid": [224, 224, 224],
                           "files": {"torchscript": {"path": "...pt", "sha256": "..."},
                                     "onnx": {"path": "...onnx", "sha256": "..."}}},
          "patch_stage": {"in_channels": 2, "patch_size": [96, 96, 96], "overlap": 0.5,
                          "batch_size": 2, "files": {...}},
          "postprocess": {"diff_grid": [128, 128, 128], "weight_max_filter": 9, "weight_sigma": 3.0,
                          "weight_filter_unit": "voxel", "weight_percentiles": [2.0, 98.0],
                          "output_max_filter": 0, "output_sigma_knots": [[0.01, 0.4], [0.03, 1.0]],
                          "output_sigma_isotropic_um": true, "output_percentiles": [2.0, 99.8],
                          "gate_knots": [[0.06, 0.5], [0.09, 0.0]], "background_threshold": 0.1},
          "trust": {"mode": "case", "rules": {"s12_corr": [[0.8, 0.0], [0.85, 0.5]]},
                    "region": "none"}   # optional; absent = mode "off" (the constant gate)
        },
        "membrane": {...}
      }
    }
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

FORMATS = ("torchscript", "onnx")
BACKEND_FORMAT = {"torchscript": "torchscript", "onnx": "onnx", "openvino": "onnx"}
"""The weights file (manifest format) each network runtime runs: OpenVINO runs the ONNX file."""
BACKENDS = tuple(BACKEND_FORMAT)
GC_INPUT_ROOT = Path("/input")
GC_OUTPUT_ROOT = Path("/output")
GC_MODEL_DIR = Path("/opt/ml/model")
INPUT_SUBDIR = Path("images/fluorescence-lightsheet-3D-microscopy")
OUTPUT_SUBDIR = Path("images/fused-fluorescence-lightsheet-3D-microscopy")
MANIFEST_NAME = "manifest.json"
PACKAGED_RESOURCES = Path(__file__).resolve().parent / "resources"
"""The weights inside an installed wheel (pyproject.toml maps the repository's ``resources/`` to the package
folder ``fusemycells/resources``): a ``pip install`` has no repository around it."""
CHECKOUT_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
"""The weights beside the package: a source checkout, and the image (``/opt/app/resources`` next to
``/opt/app/fusemycells``)."""


def bundled_resources(packaged: Path = PACKAGED_RESOURCES, checkout: Path = CHECKOUT_RESOURCES) -> Path:
    """The weights that come with the code: the wheel's package data when it holds a manifest, else the
    checkout's (or image's) ``resources/`` (where neither exists, loading it says so and names ``--resources``)."""
    return packaged if (packaged / MANIFEST_NAME).is_file() else checkout


DEFAULT_RESOURCES = bundled_resources()
DEFAULT_TIME_BUDGET_S = 480.0
"""Run time budget (s, wall time from the process's start) when the manifest names none.

FuseMyCells allows 10 minutes per case *including container transfer and model loading*, and Grand
Challenge kills a job at its limit (no output: the case scores as a failure). 480 s from the
interpreter's start (imports and weight loading included) leaves 120 s for pulling and starting the
image; the deadline degrades the networks in steps so that the output is written before it."""
DEFAULT_TARGET_SPACING_UM = 0.6
"""Isotropic spacing (µm) of the high-resolution grid H when a channel names none."""
PATCH_STAGE_DEFAULTS: dict[str, Any] = {"overlap": 0.5, "batch_size": 2}
"""Patch-stage fields a manifest may leave out (``training/export.py`` writes these)."""


class ManifestError(RuntimeError):
    """The weights manifest or a weights file is missing, malformed or fails verification."""


@dataclass(frozen=True)
class WeightsFile:
    """One exported network file, relative to the resources directory."""

    path: str
    sha256: str


@dataclass(frozen=True)
class StageSpec:
    """A network stage: its files per format and its input contract."""

    in_channels: int
    files: dict[str, WeightsFile]
    grid: tuple[int, int, int] | None = None  # global stage: fixed ZYX input grid (voxels)
    patch_size: tuple[int, int, int] | None = None  # patch stage: ZYX patch (voxels)
    overlap: float = PATCH_STAGE_DEFAULTS["overlap"]  # patch stage: fraction of the patch shared by neighbours
    batch_size: int = PATCH_STAGE_DEFAULTS[
        "batch_size"
    ]  # patch stage: patches per forward call (the OOM ladder may lower it)


NORMALISATION_KINDS = ("percentile", "zscore")


@dataclass(frozen=True)
class NormalisationSpec:
    """Network input normalisation: percentiles ``low``/``high`` (%) mapped to 0/1, or z-score."""

    kind: str = "percentile"  # 'percentile' | 'zscore'
    low: float = 1.0  # percentile (%) mapped to 0 ('percentile' only)
    high: float = 99.8  # percentile (%) mapped to 1 ('percentile' only)

    def __post_init__(self) -> None:
        if self.kind not in NORMALISATION_KINDS:
            raise ValueError(f"unknown normalisation kind '{self.kind}' (expected 'percentile' or 'zscore')")


WEIGHT_FILTER_UNITS = ("voxel", "um")


@dataclass(frozen=True)
class PostprocessSpec:
    """Difference-weighted blending and output normalisation (see :mod:`fusemycells.postprocess`)."""

    diff_grid: tuple[int, int, int] = (128, 128, 128)  # ZYX grid of the weight map (voxels)
    weight_max_filter: float = 9  # max filter size on the weight map (in weight_filter_unit; ≤ 1 voxel = off)
    weight_sigma: float = 3.0  # Gaussian σ on the weight map (in weight_filter_unit; 0 = off)
    # 'voxel': both filters in voxels of diff_grid on every axis (their µm size follows the stack's extent);
    # 'um': both in µm, per-axis voxel sizes from the stack's extent (see postprocess.weight_filters)
    weight_filter_unit: str = "voxel"
    weight_percentiles: tuple[float, float] = (2.0, 98.0)  # scaling of the weight map to [0, 1]
    output_max_filter: int = 0  # max filter on the final output (voxels); 0 = off
    # Output Gaussian σ (input-grid voxels) against the input's relative noise: knots (noise, σ) interpolated
    # linearly and held at the ends (postprocess.adaptive_settings); one knot = a constant σ; empty = off.
    output_sigma_knots: tuple[tuple[float, float], ...] = ()
    # True: the output σ is the Y/X σ and Z gets σ·spacing_x/spacing_z (isotropic in µm,
    # so an anisotropic stack is hardly smoothed along Z); False: the same σ in voxels on every axis.
    output_sigma_isotropic_um: bool = False
    output_percentiles: tuple[float, float] = (2.0, 99.8)  # final percentile normalisation
    # Knots (relative noise of the input, factor on the network's correction 0..1); empty = 1 (see TrustSpec)
    gate_knots: tuple[tuple[float, float], ...] = ()
    background_threshold: float = 0.0  # corrections fade out below this normalised input level; 0 = off

    def __post_init__(self) -> None:
        if self.weight_filter_unit not in WEIGHT_FILTER_UNITS:
            raise ValueError(f"unknown weight_filter_unit '{self.weight_filter_unit}' (expected {WEIGHT_FILTER_UNITS})")

    @property
    def output_sigma(self) -> float:
        """The constant output Gaussian σ (input-grid voxels): 0 without knots, the value of a single knot.

        A noise-adaptive policy (several knots) has no σ until a case's noise picks one
        (:func:`fusemycells.postprocess.adaptive_settings`, then :func:`with_output_sigma`)."""
        if len(self.output_sigma_knots) > 1:
            raise ValueError("output_sigma_knots hold a noise-adaptive σ: resolve it for a case (adaptive_settings)")
        return self.output_sigma_knots[0][1] if self.output_sigma_knots else 0.0


def with_output_sigma(spec: PostprocessSpec, sigma: float) -> PostprocessSpec:
    """``spec`` with the constant output Gaussian σ ``sigma`` (input-grid voxels; 0 = off): one knot."""
    return replace(spec, output_sigma_knots=((0.0, float(sigma)),) if sigma > 0 else ())


def manifest_form(spec: PostprocessSpec) -> dict[str, Any]:
    """A :class:`PostprocessSpec` as the manifest's JSON object (tuples as lists); parses back to ``spec``."""
    return {key: _as_json(value) for key, value in asdict(spec).items()}


def _as_json(value: Any) -> Any:
    return [_as_json(v) for v in value] if isinstance(value, (tuple, list)) else value


DEFAULT_POSTPROCESS: dict[str, Any] = manifest_form(PostprocessSpec())
"""The manifest's ``postprocess`` defaults: what ``training/export.py`` writes unless told otherwise."""


TRUST_MODES = ("off", "case")
TRUST_SIGNALS = ("noise", "corr_to_noise", "s12_corr", "s12_ratio", "corr_rel", "hf", "asym")
"""Signals a trust rule may name (defined in :mod:`fusemycells.trust`)."""
TRUST_REGIONS = ("none", "agreement")


@dataclass(frozen=True)
class TrustSpec:
    """Per-case trust in the network correction (see :mod:`fusemycells.trust`).

    ``mode`` 'off': the constant gate of ``postprocess.gate_knots`` (the default, so manifests
    without a ``trust`` entry behave as before); 'case': the factor on the correction is the
    minimum over ``rules`` of each rule's knots (signal value, factor) interpolated at the case's
    signal, and ``gate_knots`` only decide whether the networks run at all (gate > 0). Where the
    signals cannot be measured (the time budget cut the patch stage) the factor is
    ``fallback_factor``: 0 by default, networks off, since the calibrated policies keep them off
    unless a signal vouches for them (the constant gate harmed held-out cases, docs/quality.md).
    """

    mode: str = "off"
    rules: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()  # (signal name, knots)
    region: str = "none"  # 'agreement': × the local stage-1/stage-2 agreement (per region)
    region_sigma: float = 1.5  # Gaussian σ of the agreement map (global-grid voxels)
    foreground: float = 0.1  # normalised input level above which voxels count for the signals
    fallback_factor: float = 0.0  # the factor when the signals cannot be measured (the time budget cut the patch stage)

    def __post_init__(self) -> None:
        if self.mode not in TRUST_MODES:
            raise ValueError(f"unknown trust mode '{self.mode}' (expected one of {TRUST_MODES})")
        if self.region not in TRUST_REGIONS:
            raise ValueError(f"unknown trust region '{self.region}' (expected one of {TRUST_REGIONS})")
        unknown = [name for name, _ in self.rules if name not in TRUST_SIGNALS]
        if unknown:
            raise ValueError(f"unknown trust signal(s) {unknown} (known: {TRUST_SIGNALS})")
        if not 0.0 <= self.fallback_factor <= 1.0:
            raise ValueError(f"trust fallback_factor must be in [0, 1], got {self.fallback_factor}")


def trust_form(spec: TrustSpec) -> dict[str, Any]:
    """A :class:`TrustSpec` as the manifest's JSON object (rules as {signal: knots}); parses back to ``spec``."""
    form = {key: _as_json(value) for key, value in asdict(spec).items() if key != "rules"}
    form["rules"] = {name: _as_json(knots) for name, knots in spec.rules}
    return form


@dataclass(frozen=True)
class ChannelSpec:
    """Everything inference needs for one channel ('nucleus' or 'membrane')."""

    name: str
    target_spacing_um: float
    normalisation: NormalisationSpec
    global_stage: StageSpec
    patch_stage: StageSpec
    postprocess: PostprocessSpec
    trust: TrustSpec = field(default_factory=TrustSpec)


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` and the directory its file paths are relative to."""

    root: Path
    channels: dict[str, ChannelSpec]
    provenance: dict[str, Any] = field(default_factory=dict)
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S  # whole run; ``--time-budget`` overrides

    def channel(self, name: str) -> ChannelSpec:
        if name not in self.channels:
            raise ManifestError(f"manifest has no weights for channel '{name}' (has {sorted(self.channels)})")
        return self.channels[name]


def without_trust(manifest: Manifest) -> Manifest:
    """``manifest`` with every channel's trust off (the constant noise gate): the networks and the blend
    run on every case the noise gate lets through. Benchmarks time this worst case; shipped trust may
    skip both networks (a factor of 0) and with them most of the work."""
    channels = {name: replace(spec, trust=TrustSpec()) for name, spec in manifest.channels.items()}
    return replace(manifest, channels=channels)


@dataclass
class RunConfig:
    """Settings of one ``inference.py`` run (CLI flags over manifest defaults)."""

    input_dir: Path = GC_INPUT_ROOT / INPUT_SUBDIR
    output_dir: Path = GC_OUTPUT_ROOT / OUTPUT_SUBDIR
    resources_dir: Path | None = None  # None: /opt/ml/model when valid, else bundled resources/
    device: str = "auto"  # auto | cuda | cpu
    backend: str = "auto"  # auto | torchscript | onnx | openvino
    precision: str = "auto"  # auto | fp32 | bf16 (a CPU forward's; see fusemycells.runtime.precision)
    report: Path | None = None
    output_dtype: str = "uint16"  # uint16 (the normalised output's [min, max] scaled to 0..65535) | float32
    vram_budget_gib: float | None = None  # None: a safe fraction of free device memory
    ram_budget_gib: float | None = None  # None: a safe fraction of available host memory
    time_budget_s: float | None = None  # None: no deadline
    threads: int | None = None  # CPU threads for torch/onnxruntime; None: library default


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise ManifestError(f"manifest field '{name}' must be a positive int or 3 positive ints, got {value!r}")


def _stage(raw: dict[str, Any], where: str) -> StageSpec:
    try:
        files = {
            fmt: WeightsFile(path=str(f["path"]), sha256=str(f["sha256"]).lower()) for fmt, f in raw["files"].items()
        }
        unknown = set(files) - set(FORMATS)
        if unknown:
            raise ManifestError(f"{where}: unknown weight formats {sorted(unknown)} (known: {FORMATS})")
        return StageSpec(
            in_channels=int(raw["in_channels"]),
            files=files,
            grid=_triple(raw["grid"], f"{where}.grid") if "grid" in raw else None,
            patch_size=_triple(raw["patch_size"], f"{where}.patch_size") if "patch_size" in raw else None,
            overlap=float(raw.get("overlap", PATCH_STAGE_DEFAULTS["overlap"])),
            batch_size=int(raw.get("batch_size", PATCH_STAGE_DEFAULTS["batch_size"])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: malformed stage entry ({exc})") from exc


POSTPROCESS_FIELDS = tuple(PostprocessSpec.__dataclass_fields__)


def _postprocess(raw: dict[str, Any]) -> PostprocessSpec:
    """The channel's ``postprocess`` object (format 2), validated; absent fields take the defaults."""
    unknown = sorted(set(raw) - set(POSTPROCESS_FIELDS))
    if unknown:
        known = list(POSTPROCESS_FIELDS)
        raise ManifestError(f"postprocess: unknown field(s) {unknown} (format_version 2 knows {known})")
    default = PostprocessSpec()
    unit = str(raw.get("weight_filter_unit", default.weight_filter_unit))
    size = raw.get("weight_max_filter", default.weight_max_filter)
    try:
        return PostprocessSpec(
            diff_grid=_triple(raw.get("diff_grid", list(default.diff_grid)), "postprocess.diff_grid"),
            weight_max_filter=int(size) if unit == "voxel" else float(size),
            weight_sigma=float(raw.get("weight_sigma", default.weight_sigma)),
            weight_filter_unit=unit,
            weight_percentiles=tuple(raw.get("weight_percentiles", default.weight_percentiles)),  # type: ignore[arg-type]
            output_max_filter=int(raw.get("output_max_filter", default.output_max_filter)),
            output_sigma_knots=_knots(raw.get("output_sigma_knots", []), "postprocess.output_sigma_knots"),
            output_sigma_isotropic_um=bool(raw.get("output_sigma_isotropic_um", default.output_sigma_isotropic_um)),
            output_percentiles=tuple(raw.get("output_percentiles", default.output_percentiles)),  # type: ignore[arg-type]
            gate_knots=_knots(raw.get("gate_knots", []), "postprocess.gate_knots"),
            background_threshold=float(raw.get("background_threshold", default.background_threshold)),
        )
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"postprocess: {exc}") from exc


FORMAT_VERSION = 2
"""The manifest format :func:`parse_manifest` reads natively and ``training/export.py`` writes."""
POSTPROCESS_V1_KEPT = (
    "diff_grid", "weight_percentiles", "output_max_filter", "output_sigma_isotropic_um", "output_percentiles",
    "gate_knots", "background_threshold",
)
"""Version-1 ``postprocess`` fields that version 2 keeps as they are."""


def upgrade_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` in the current format (2): version 1 converted (a new dict; ``raw`` is untouched), else as is.

    Version 2 merged the overlapping ``postprocess`` knobs of version 1 (same behaviour):

    - ``max_filter`` / ``sigma`` (voxels of ``diff_grid``) and ``max_filter_um`` / ``sigma_um`` (µm, each
      overriding its voxel twin when > 0) became ``weight_max_filter`` / ``weight_sigma`` in one
      ``weight_filter_unit`` ('voxel' | 'um'). A version-1 manifest with one filter in µm and the other an
      active filter in voxels has no version-2 form and is refused (convert it by hand).
    - ``output_gaussian_sigma`` (a constant σ) and ``sigma_knots`` (noise → σ, overriding it when non-empty)
      became ``output_sigma_knots``: the knots, else one knot ``[0, σ]`` (a constant), else none (off).

    ``gate_knots`` and the ``trust`` rules stay two knobs: they answer different questions. ``gate_knots``
    map the input's noise, measured before any network runs, to whether the networks run at all (gate 0
    skips both stages and their time) and, with trust 'off', to the factor on the correction. Trust rules
    map signals of the networks' own outputs (stage agreement, high frequencies), known only after they
    ran, to that factor in mode 'case'. A noise rule under trust would run the networks first; a
    signal rule in the gate cannot be evaluated before them. Other versions raise :class:`ManifestError`.
    """
    version = raw.get("format_version")
    if version == FORMAT_VERSION:
        return raw
    if version != 1:
        raise ManifestError(
            f"unsupported manifest format_version {version!r} (this fusemycells reads 1 and {FORMAT_VERSION};"
            " a newer manifest needs a newer fusemycells)"
        )
    channels = raw.get("channels", {})
    if isinstance(channels, dict):
        channels = {name: _channel_v1(name, entry) for name, entry in channels.items()}
    return {**raw, "format_version": FORMAT_VERSION, "channels": channels}


def _channel_v1(name: str, entry: Any) -> Any:
    """One version-1 channel entry with its ``postprocess`` object in version 2's form."""
    if not isinstance(entry, dict) or not isinstance(entry.get("postprocess", {}), dict):
        return entry  # malformed: the version-2 parser says so
    return {**entry, "postprocess": postprocess_v1_to_v2(entry.get("postprocess", {}), f"channels.{name}")}


def postprocess_v1_to_v2(old: dict[str, Any], where: str = "postprocess") -> dict[str, Any]:
    """A version-1 ``postprocess`` object in version 2's fields (see :func:`upgrade_manifest`)."""
    new = {key: old[key] for key in POSTPROCESS_V1_KEPT if key in old}
    new["weight_filter_unit"] = "voxel"
    size, sigma = old.get("max_filter", 9), old.get("sigma", 3.0)
    size_um, sigma_um = float(old.get("max_filter_um", 0.0)), float(old.get("sigma_um", 0.0))
    if size_um > 0 or sigma_um > 0:
        if (size_um <= 0 and int(size) > 1) or (sigma_um <= 0 and float(sigma) > 0):
            raise ManifestError(
                f"{where}.postprocess: one weight-map filter in µm and the other in voxels (max_filter {size},"
                f" max_filter_um {size_um}, sigma {sigma}, sigma_um {sigma_um}): format_version 2 has one unit"
            )
        size, sigma, new["weight_filter_unit"] = size_um, sigma_um, "um"
    new["weight_max_filter"], new["weight_sigma"] = size, sigma
    knots, constant = old.get("sigma_knots", []), float(old.get("output_gaussian_sigma", 0.0))
    new["output_sigma_knots"] = knots if len(knots) else ([[0.0, constant]] if constant > 0 else [])
    return {key: new[key] for key in POSTPROCESS_FIELDS if key in new}  # in the dataclass's order


def _trust(raw: Any, where: str) -> TrustSpec:
    """The channel's optional ``trust`` object (absent: mode 'off', the constant gate)."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object, got {raw!r}")
    known = {"mode", "rules", "region", "region_sigma", "foreground", "fallback_factor"}
    if set(raw) - known:
        raise ManifestError(f"{where}: unknown field(s) {sorted(set(raw) - known)} (known: {sorted(known)})")
    default = TrustSpec()
    rules = raw.get("rules", {})
    if not isinstance(rules, dict):
        raise ManifestError(f"{where}.rules: expected an object {{signal: [[value, factor], ...]}}, got {rules!r}")
    try:
        return TrustSpec(
            mode=str(raw.get("mode", default.mode)),
            rules=tuple((str(name), _rule_knots(knots, f"{where}.rules.{name}")) for name, knots in rules.items()),
            region=str(raw.get("region", default.region)),
            region_sigma=float(raw.get("region_sigma", default.region_sigma)),
            foreground=float(raw.get("foreground", default.foreground)),
            fallback_factor=float(raw.get("fallback_factor", default.fallback_factor)),
        )
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def _rule_knots(value: Any, name: str) -> tuple[tuple[float, float], ...]:
    knots = _knots(value, name)
    if not knots:
        raise ManifestError(f"manifest field '{name}' needs at least one [value, factor] pair")
    return knots


def _normalisation(raw: Any, where: str) -> NormalisationSpec:
    if not isinstance(raw, dict) or set(raw) - {"kind", "low", "high"}:
        raise ManifestError(f"{where}: expected an object with 'kind', 'low', 'high', got {raw!r}")
    try:
        return NormalisationSpec(**{k: v if k == "kind" else float(v) for k, v in raw.items()})
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def _knots(value: Any, name: str) -> tuple[tuple[float, float], ...]:
    try:
        knots = tuple((float(a), float(b)) for a, b in value)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"manifest field '{name}' must be a list of [noise, value] pairs, got {value!r}") from exc
    if any(b[0] <= a[0] for a, b in zip(knots, knots[1:])):
        raise ManifestError(f"manifest field '{name}' must have increasing noise levels, got {value!r}")
    return knots


def parse_manifest(raw: dict[str, Any], root: Path) -> Manifest:
    """Validate a manifest dict; file paths are relative to ``root``."""
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(raw).__name__}")
    raw = upgrade_manifest(raw)
    entries = raw.get("channels", {})
    if not isinstance(entries, dict):
        raise ManifestError(f"manifest field 'channels' must be an object of channel entries, got {entries!r}")
    channels = {name: _channel(name, entry) for name, entry in entries.items()}
    if not channels:
        raise ManifestError("manifest lists no channels")
    budget = raw.get("time_budget_s", DEFAULT_TIME_BUDGET_S)
    if budget is not None and (not isinstance(budget, (int, float)) or budget <= 0):
        raise ManifestError(f"time_budget_s must be a positive number of seconds or null, got {budget!r}")
    return Manifest(
        root=root,
        channels=channels,
        provenance=dict(raw.get("provenance", {})),
        time_budget_s=None if budget is None else float(budget),
    )


def _channel(name: str, entry: Any) -> ChannelSpec:
    """One channel entry of the manifest, validated."""
    where = f"channels.{name}"
    parts = ("global_stage", "patch_stage", "postprocess")
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k, {}), dict) for k in parts):
        raise ManifestError(f"manifest {where}: expected an object with {', '.join(parts)} objects")
    try:
        channel = ChannelSpec(
            name=name,
            target_spacing_um=float(entry.get("target_spacing_um", DEFAULT_TARGET_SPACING_UM)),
            normalisation=_normalisation(entry.get("normalisation", {}), f"{where}.normalisation"),
            global_stage=_stage(entry["global_stage"], f"{where}.global_stage"),
            patch_stage=_stage(entry["patch_stage"], f"{where}.patch_stage"),
            postprocess=_postprocess(entry.get("postprocess", {})),
            trust=_trust(entry.get("trust", {}), f"{where}.trust"),
        )
    except KeyError as exc:
        raise ManifestError(f"{where}: missing field {exc}") from exc
    if channel.global_stage.grid is None:
        raise ManifestError(f"{where}.global_stage: 'grid' is required")
    if channel.patch_stage.patch_size is None:
        raise ManifestError(f"{where}.patch_stage: 'patch_size' is required")
    return channel


def load_manifest(resources_dir: Path) -> Manifest:
    """Read and validate ``<resources_dir>/manifest.json`` (files are verified when loaded)."""
    path = Path(resources_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"weights manifest not found: {path} (pass --resources DIR, a folder with {MANIFEST_NAME})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return parse_manifest(raw, Path(resources_dir))


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified_path(manifest: Manifest, weights: WeightsFile) -> Path:
    """Absolute path of a weights file after checking it exists and matches its sha256."""
    path = manifest.root / weights.path
    if not path.is_file():
        raise ManifestError(f"weights file missing: {path}")
    actual = sha256_of(path)
    if actual != weights.sha256:
        raise ManifestError(f"checksum mismatch for {path}: manifest {weights.sha256[:12]}…, file {actual[:12]}…")
    return path


def verify_files(manifest: Manifest, require_all: bool = False) -> list[str]:
    """Problems with the manifest's weight files (missing, checksum mismatch), as messages.

    By default a stage counts as usable when at least one of its formats verifies (the backends
    fall back to the other format); ``require_all`` reports every bad file.
    """
    problems: list[str] = []
    for name, channel in sorted(manifest.channels.items()):
        for stage_name, stage in (("global_stage", channel.global_stage), ("patch_stage", channel.patch_stage)):
            errors = []
            for weights in stage.files.values():
                try:
                    verified_path(manifest, weights)
                except ManifestError as exc:
                    errors.append(str(exc))
            if require_all or len(errors) == len(stage.files):
                problems += [f"{name}.{stage_name}: {e}" for e in errors]
    return problems


def resolve_resources_dir(
    cli_value: Path | None, model_dir: Path = GC_MODEL_DIR, default: Path = DEFAULT_RESOURCES
) -> tuple[Path, str]:
    """Where to load weights from, and why.

    An explicit ``--resources`` wins. Otherwise a Grand Challenge model archive mounted at
    ``/opt/ml/model`` is used when its manifest parses and every stage has a file that verifies;
    else the bundled ``resources/``.
    """
    if cli_value is not None:
        return Path(cli_value), "--resources"
    if (model_dir / MANIFEST_NAME).is_file():
        try:
            problems = verify_files(load_manifest(model_dir))
        except ManifestError as exc:
            problems = [str(exc)]
        if not problems:
            return model_dir, f"model archive at {model_dir}"
        return default, f"bundled resources ({model_dir} ignored: {'; '.join(problems)})"
    return default, "bundled resources"
