"""Calibrate the per-case trust of the shipped manifest (issues #24, #26): leave one family out, then
write the policies into ``resources/manifest.json``.

    python -m training.calibrate_trust --rows ROWS.json [--set NAME=ROOT[:N] ...] [--resources DIR]
        [--margin M] [--buffer B] [--clean-noise N | --no-clean-prior] [--table FILE] [--write-manifest FILE]

``ROWS.json``: the per-case rows ``benchmarks/trust_study.py --json`` measures (signals and N-SSIM per
policy key under both SSIM conventions; the study runs the container's steps and the networks, this
module runs none). ``--set``: the study's set list, recorded in the manifest's provenance (only the
names and case counts are read; without it the provenance records each set's number of rows).

Per channel :func:`calibrate` runs :func:`training.trust_calibration.leave_one_family_out` (policies
of up to two conditions on :data:`SEARCH_SIGNALS`, factors :data:`TRUST_KEYS`, priors
:data:`DIRECTIONS` and noise ≥ :data:`CLEAN_NOISE` unless ``--no-clean-prior`` names the channel; a policy
ships only if its rule level holds on families it did not see: two conditions, else one, else a constant
factor, else networks off), prints the decision table under both SSIM conventions (``--table`` writes
it: docs/quality_table.md) and ``--write-manifest`` writes the policies into ``channels.<ch>.trust``
and ``provenance.trust_calibration``, keeping everything else. New weights: rerun the study with their
``--resources``, then this with the same ``--resources`` (docs/quality.md gives both commands).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusemycells.config import DEFAULT_RESOURCES, MANIFEST_NAME, Manifest, TrustSpec, load_manifest, trust_form
from training import trust_calibration as cal

Row = dict[str, Any]

SEARCH_SIGNALS = ("noise", "corr_to_noise", "s12_corr", "s12_ratio", "corr_rel", "hf", "asym")
"""Signals the calibration may use: those without extra network forwards (the flip signals cost
forwards and did not predict the benefit, docs/quality.md)."""
TRUST_KEYS = ("none@0.25", "agreement@0.25", "agreement@0.5", "none@0.5")
"""Factors a calibrated policy may give (mildest first: ties go to them): at most ½, over the whole stack or
times the stages' agreement map (``agreement``: the region-wise trust; ½ added with the v4c weights). Full weight is
scored for the table but not offered: v3 at full weight collapses on whole families (the independent
simulator's nuclei, near-identity stacks at −5 to −30), and with a handful of cases per family a
threshold that lets one such case through costs far more than a ½ factor gains (measured: leave one
family out, worst held-out case −0.100 with full weight offered, −0.018 without, docs/quality.md)."""
DIRECTIONS = {"noise": (True,), "corr_to_noise": (False,)}
"""Never trust a case *because* its noise is small: no 'noise ≤ t' and no 'corr_to_noise ≥ t' (large
when the noise is small: the v3 rule that corrected a clean stack at −1.74)."""
CLEAN_NOISE = 0.012
"""Relative noise below which a stack counts as clean and is never corrected (a prior, not learned; NOT
independent of the near-identity family, whose noise reaches 0.0113: with 0.010 the rule fitted without
that family corrected its noisiest case at −1.08, docs/quality.md)."""
CONSTANT_GATE = {"nucleus": "none@0.5", "membrane": "none@0.25"}
"""The constant gate of the comparison (½ nuclei, ¼ membranes, no trust)."""
CONVENTIONS = {
    "n_ssim": "uniform 7³ window (fusemycells.evaluation.metrics)",
    "n_ssim_gaussian_window": "Gaussian window σ 1.5 (skimage, BiaPy)",
}
"""The rows' N-SSIM keys: one per SSIM convention."""
MIN_GAIN = 0.002
"""Least mean gain over networks off (families weighted equally) a policy must reach to ship."""
COMMAND = "python -m training.calibrate_trust (leave one family out)"
"""What ``provenance.trust_calibration.command`` records."""


def calibrate(rows: Sequence[Row], margin: float, buffer: float, clean: float = 0.0, scores: str = "n_ssim") -> cal.Calibration:
    """A channel's policy fitted on every family and each family's held-out figures
    (:func:`training.trust_calibration.leave_one_family_out`) under the SSIM convention ``scores``
    (a key of :data:`CONVENTIONS`); with ``clean`` > 0 every trusting policy also requires noise ≥
    ``clean`` (a clean stack is never corrected)."""
    required = (cal.Condition("noise", True, clean),) if clean > 0 else ()
    search = cal.Search(keys=TRUST_KEYS, signals=SEARCH_SIGNALS, directions=DIRECTIONS, required=required)
    out = cal.leave_one_family_out(rows, search, margin=margin, buffer=buffer, min_gain=MIN_GAIN, scores=scores)
    out.search = search
    return out


def of_channel(rows: Sequence[Row], channel: str) -> list[Row]:
    """The rows of one channel."""
    return [r for r in rows if r["channel"] == channel]


def calibrate_channels(
    rows: Sequence[Row], margin: float, buffer: float, clean: dict[str, float], scores: str = "n_ssim"
) -> dict[str, cal.Calibration]:
    """:func:`calibrate` for every channel the rows hold (``clean``: the clean-stack noise per channel)."""
    channels = sorted({r["channel"] for r in rows})
    return {ch: calibrate(of_channel(rows, ch), margin, buffer, clean.get(ch, 0.0), scores) for ch in channels}


def _cell(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f})"


def _table_row(members: Sequence[Row], policy: cal.Policy, channel: str, scores: str) -> tuple[list[str], float, float]:
    """One family × channel line of :func:`quality_table`: its cells, the shipped and networks-off means."""
    shipped = [r[scores][policy.key_for(r)] for r in members]
    columns = {
        "networks off": [r[scores]["none@0"] for r in members],
        "constant gate": [r[scores][CONSTANT_GATE[channel]] for r in members],
        "full weight": [r[scores]["none@1"] for r in members],
        "Gaussian": [r[scores]["gaussian"] for r in members],
    }
    gains = [s - o for s, o in zip(shipped, columns["networks off"])]
    best = max(columns, key=lambda k: np.mean(columns[k]))
    gap = float(np.mean(columns[best]) - np.mean(shipped))
    verdict = "shipped" if gap <= 0 else (f"{best} (+{gap:.3f})" + (" ✗" if gap > 0.01 else ""))
    cells = [str(len(members)), f"**{_cell(shipped)}**", *(_cell(v) for v in columns.values())]
    cells += [f"{np.mean(gains):+.3f} / {min(gains):+.3f}", verdict]
    return cells, float(np.mean(shipped)), float(np.mean(columns["networks off"]))


def quality_table(rows: Sequence[Row], chosen: dict[str, cal.Calibration], scores: str = "n_ssim") -> str:
    """The decision table (markdown): per family × channel the shipped policy (fitted WITHOUT that family),
    networks off, the constant gate, full weight, the Gaussian baseline, mean (min) N-SSIM under
    ``scores``; then the families' average and the checks of issue #24."""
    head = (
        "| family | channel | n | **shipped** (held out) | networks off | constant gate | full weight | Gaussian "
        "| shipped − off: mean / worst case | best column |"
    )
    lines = [head, "|" + "---|" * 10]
    averages: dict[str, list[tuple[float, float]]] = {}
    for channel, calibration in sorted(chosen.items()):
        for fam, (policy, _) in sorted(calibration.held_out.items()):
            members = [r for r in of_channel(rows, channel) if cal.family_of(r["set"]) == fam]
            cells, shipped, off = _table_row(members, policy, channel, scores)
            lines.append("| " + " | ".join([fam, channel, *cells]) + " |")
            averages.setdefault(channel, []).append((shipped, off))
    lines.append("")
    for channel, pairs in sorted(averages.items()):
        shipped, off = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
        best = cal.ceiling(of_channel(rows, channel), TRUST_KEYS, scores)["mean"]
        lines.append(
            f"- {channel}: averaged over the {len(pairs)} families, shipped (held out) {shipped:.3f} vs networks off "
            f"{off:.3f}: {shipped - off:+.3f} ({'≥' if shipped - off >= 0.05 else '<'} +0.05); a perfect case-level "
            f"choice among the offered factors would gain {best:+.3f} (trust_calibration.ceiling)"
        )
    return "\n".join(lines)


def report_calibration(rows: Sequence[Row], chosen: dict[str, cal.Calibration]) -> None:
    """Print each channel's shipped policy, its in-sample figures, each family's held-out policy, and the
    decision table under both SSIM conventions."""
    for channel, calibration in sorted(chosen.items()):
        mine = of_channel(rows, channel)
        mean, worst_family, worst_case = cal.summary(mine, calibration.policy)
        trusted = sum(calibration.policy.key_for(r) != cal.OFF_KEY for r in mine)
        print(f"\n{channel}: shipped policy: {calibration.policy.describe()}")
        kept = calibration.fitted == calibration.policy
        print(f"  fitted on every family: {calibration.fitted.describe()}" + (
            "" if kept else " (not shipped: its held-out figures do not hold; the ladder ships the policy above)"))
        print(
            f"  in-sample gain over networks off: mean of families {mean:+.4f}, worst family {worst_family:+.4f}, "
            f"worst case {worst_case:+.3f}; trusted {trusted}/{len(mine)}"
        )
        lo_mean, lo_family, lo_case = calibration.loso()
        print(f"  leave-one-family-out: mean {lo_mean:+.4f}, worst family {lo_family:+.4f}, worst case {lo_case:+.3f}")
        for fam, (policy, gains) in calibration.held_out.items():
            print(f"    without {fam}: {policy.describe()}; on {fam}: mean {gains.mean():+.4f}, worst {gains.min():+.3f}")
    for scores, name in CONVENTIONS.items():
        print(f"\nN-SSIM, {name}: mean (min); shipped = the policy calibrated without the row's family")
        print(quality_table(rows, chosen, scores))


def provenance(
    rows: Sequence[Row], shipped: Manifest, sets: dict[str, int | str], chosen: dict[str, cal.Calibration],
    other: dict[str, cal.Policy], margin: float, buffer: float, clean: dict[str, float],
) -> dict[str, Any]:
    """The manifest's ``provenance.trust_calibration``: what was calibrated on, for which networks, with
    which settings, what ships, the held-out figures and the ceiling (``other``: the policies calibrated
    under the Gaussian-window SSIM)."""

    return {
        "command": COMMAND,
        "date": time.strftime("%Y-%m-%d"),
        "weights_sha256": {  # the networks this calibration is for (first 12 hex digits per stage file)
            name: sorted(f.sha256[:12] for st in (ch.global_stage, ch.patch_stage) for f in st.files.values())
            for name, ch in shipped.channels.items()
        },
        "sets": dict(sorted(sets.items())),
        "families": sorted({cal.family_of(name) for name in sets}),
        "cases": len(rows),
        "margin": margin,
        "buffer": buffer,
        "clean_noise": {ch: v for ch, v in clean.items() if ch in chosen},
        "policies": {ch: c.policy.describe() for ch, c in chosen.items()},
        "fitted_on_all_families": {ch: c.fitted.describe() for ch, c in chosen.items()},
        "fitted_leave_one_family_out": {ch: [round(v, 4) for v in c.fitted_loso or ()] for ch, c in chosen.items()},
        "leave_one_family_out": {ch: [round(v, 4) for v in c.loso()] for ch, c in chosen.items()},
        "policies_gaussian_window_ssim": {ch: p.describe() for ch, p in other.items()},
        "ceiling": {  # a perfect case-level choice among the offered factors (trust_calibration.ceiling)
            ch: round(cal.ceiling(of_channel(rows, ch), TRUST_KEYS)["mean"], 4) for ch in chosen
        },
    }


def write_manifest(path: Path, policies: dict[str, cal.Policy], record: dict[str, Any]) -> None:
    """Put each channel's policy into the manifest at ``path`` (``channels.<ch>.trust``) and ``record``
    into ``provenance.trust_calibration``, keeping the rest."""
    raw = json.loads(path.read_text())
    for channel, policy in policies.items():
        if channel in raw.get("channels", {}):
            spec = TrustSpec(mode="case", rules=tuple(policy.rules().items()), region=policy.region)
            raw["channels"][channel]["trust"] = trust_form(spec)
    raw.setdefault("provenance", {})["trust_calibration"] = record
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")


def parse_sets(values: Sequence[str]) -> dict[str, tuple[Path, int | None]]:
    """``NAME=ROOT[:N]`` → {NAME: (ROOT, N)}: N the cases per channel taken from the set (all without)."""
    sets: dict[str, tuple[Path, int | None]] = {}
    for value in values:
        name, _, root = value.partition("=")
        if not root:
            raise SystemExit(f"--set expects NAME=ROOT[:N], got {value!r}")
        folder, _, count = root.rpartition(":") if root.rpartition(":")[2].isdigit() else (root, "", "")
        sets[name] = (Path(folder), int(count) if count else None)
    return sets


def recorded_sets(rows: Sequence[Row], sets: dict[str, tuple[Path, int | None]] | None) -> dict[str, int | str]:
    """The provenance's ``sets``: per set the cases per channel taken ('all' for every case) from the
    study's ``--set`` list, or without one the number of rows of each set ('N rows')."""
    if sets:
        return {name: (n if n is not None else "all") for name, (_, n) in sets.items()}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["set"]] = counts.get(r["set"], 0) + 1
    return {name: f"{n} rows" for name, n in counts.items()}


def run(
    rows: Sequence[Row], resources: Path, sets: dict[str, tuple[Path, int | None]] | None = None,
    margin: float = 0.03, buffer: float = 0.25, clean_noise: float | None = CLEAN_NOISE,
    table: Path | None = None, manifest: Path | None = None, without_prior: Sequence[str] = (),
) -> dict[str, cal.Calibration]:
    """Calibrate every channel of ``rows`` for the networks of ``resources`` (``clean_noise`` None: no
    clean-stack prior for any channel; ``without_prior``: the channels calibrated without it), print the
    report, write the decision table to ``table`` and the policies into ``manifest`` (a manifest file or a
    folder holding one) when given; returns the calibrations."""
    shipped = load_manifest(resources)
    clean = {ch: (clean_noise if clean_noise is not None and ch not in without_prior else 0.0) for ch in shipped.channels}
    chosen = calibrate_channels(rows, margin, buffer, clean)
    report_calibration(rows, chosen)
    other = {ch: c.policy for ch, c in calibrate_channels(rows, margin, buffer, clean, "n_ssim_gaussian_window").items()}
    for channel, policy in sorted(other.items()):
        same = "the same choice" if policy == chosen[channel].policy else "a DIFFERENT choice"
        print(f"{channel}: calibrated under the Gaussian-window SSIM: {policy.describe()} ({same})")
    if table is not None:
        tables = (f"N-SSIM, {name}:\n\n{quality_table(rows, chosen, key)}" for key, name in CONVENTIONS.items())
        table.write_text("\n\n".join(tables) + "\n")
    if manifest is not None:
        record = provenance(rows, shipped, recorded_sets(rows, sets), chosen, other, margin, buffer, clean)
        target = manifest / MANIFEST_NAME if manifest.is_dir() else manifest
        write_manifest(target, {ch: c.policy for ch, c in chosen.items()}, record)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="benchmarks/trust_study.py --json output")
    parser.add_argument("--set", action="append", metavar="NAME=ROOT[:N]", help="the study's sets (provenance)")
    parser.add_argument("--resources", type=Path, default=DEFAULT_RESOURCES, help="weights folder (manifest.json)")
    parser.add_argument("--margin", type=float, default=0.03, help="largest drop below networks off allowed on a tuning case")
    parser.add_argument("--buffer", type=float, default=0.25, help="threshold shift (signal σ) that must stay safe")
    parser.add_argument("--clean-noise", type=float, default=CLEAN_NOISE, help="noise below which a stack is clean")
    parser.add_argument(
        "--no-clean-prior", nargs="*", metavar="CHANNEL", default=None,
        help="let the calibration trust stacks below the σ floor's noise for these channels (none named: every "
        "channel; default: never)",
    )
    parser.add_argument("--table", type=Path, default=None, help="write the decision table (markdown) here")
    parser.add_argument("--write-manifest", type=Path, default=None, help="write the chosen policies into this manifest")
    args = parser.parse_args(argv)
    rows = json.loads(args.rows.read_text())
    if not rows:
        parser.error(f"{args.rows}: no rows")
    run(
        rows, args.resources, parse_sets(args.set) if args.set else None, args.margin, args.buffer,
        clean_noise=args.clean_noise if args.no_clean_prior != [] else None, without_prior=args.no_clean_prior or (),
        table=args.table, manifest=args.write_manifest,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
