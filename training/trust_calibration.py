"""Leave-one-family-out calibration of the per-case trust policy (issue #24, item 2): pure functions
on the per-case rows of ``benchmarks/trust_study.py`` (``--json``). :mod:`training.calibrate_trust` runs
them per channel and writes the chosen policies into the manifest.

A row: ``{"set", "channel", "signals": {name: value}, "old_gate", "n_ssim": {key: N-SSIM}}`` where a
key is ``'none@0'`` (networks off) or ``'<region>@<gate>'`` (the networks' correction × gate, region
'none' or 'agreement', see :mod:`fusemycells.trust`). A *family* is a group of sets from one
generator (:func:`family_of`: our simulator's sets, the independent simulator's seeds, ...).

A :class:`Policy` is one scored key plus up to two conditions ``signal ≥ t`` / ``signal ≤ t`` (all
must hold, else networks off). :func:`fit` picks, among every such policy on the rows it is given,
the one with the best mean benefit over networks off (families weighted equally) that is *safe*
there: no case more than ``margin`` below networks off and no family below it in the mean, also with
every threshold moved ``buffer`` standard deviations of its signal towards trusting more.
:func:`leave_one_family_out` fits without each family in turn and scores that family, an honest
estimate of what the policy does on a family it never saw. What ships is :func:`procedure`'s: the fit on
all families at the most expressive rule level (two conditions, one, a constant factor) whose held-out
figures hold, else networks off.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

OFF_KEY = "none@0"
Row = Mapping[str, Any]


def family_of(set_name: str) -> str:
    """The family of a set: 'ours' (training/simulate.py tuning seeds 'ours*'), 'xc' (the independent
    simulator's seeds 'xc*'), else the set's own name (one generator per set)."""
    for prefix in ("ours", "xc"):
        if set_name.startswith(prefix):
            return prefix
    return set_name


@dataclass(frozen=True)
class Condition:
    """``signal ≥ threshold`` (``above``) or ``signal ≤ threshold``."""

    signal: str
    above: bool
    threshold: float

    def holds(self, signals: Mapping[str, float]) -> bool:
        value = float(signals[self.signal])
        return value >= self.threshold if self.above else value <= self.threshold

    def describe(self) -> str:
        return f"{self.signal} {'≥' if self.above else '≤'} {self.threshold:.4g}"


@dataclass(frozen=True)
class Policy:
    """Apply ``key``'s correction when every condition holds (and the noise gate lets the networks run)."""

    key: str = OFF_KEY
    conditions: tuple[Condition, ...] = ()

    @property
    def region(self) -> str:
        return self.key.split("@")[0]

    @property
    def gate(self) -> float:
        return float(self.key.split("@")[1])

    def key_for(self, row: Row) -> str:
        """The scored key of ``row`` this policy writes ('none@0' where it keeps the networks off)."""
        if self.gate <= 0.0 or row.get("old_gate", 1.0) <= 0.0:  # the manifest's noise gate skips the networks
            return OFF_KEY
        return self.key if all(c.holds(row["signals"]) for c in self.conditions) else OFF_KEY

    def rules(self) -> dict[str, tuple[tuple[float, float], ...]]:
        """The manifest's trust rules: the first condition a step 0 → gate, the others 0 → 1 (the case
        factor is their minimum, so the gate exactly when all hold); a constant rule without conditions.
        Each step is 1e-4 wide, outside the trusted side, as :func:`fusemycells.trust.rule_factor` reads it."""
        if self.gate <= 0.0:
            return {"noise": ((0.0, 0.0),)}
        if not self.conditions:
            return {"noise": ((0.0, self.gate),)}
        merged: dict[tuple[str, bool], float] = {}  # one rule per signal: the stricter of two thresholds
        for c in self.conditions:
            t = float(c.threshold)
            old = merged.get((c.signal, c.above))
            merged[(c.signal, c.above)] = t if old is None else (max(old, t) if c.above else min(old, t))
        if len({signal for signal, _ in merged}) < len(merged):
            raise ValueError(f"{self.describe()}: one signal bounded from both sides is not one manifest rule")
        out = {}
        for i, ((signal, above), t) in enumerate(merged.items()):
            high = self.gate if i == 0 else 1.0
            knots = ((round(t - 1e-4, 6), 0.0), (t, high)) if above else ((t, high), (round(t + 1e-4, 6), 0.0))
            out[signal] = knots
        return out

    def describe(self) -> str:
        if self.gate <= 0.0:
            return "networks off"
        region = f", region {self.region}" if self.region != "none" else ""
        when = " and ".join(c.describe() for c in self.conditions)
        return f"factor {self.gate:g}{region}" + (f" when {when} (else networks off)" if when else " (constant)")


OFF = Policy()


def benefits(rows: Sequence[Row], policy: Policy, scores: str = "n_ssim") -> np.ndarray:
    """Per row: N-SSIM of the policy's output − N-SSIM of networks off."""
    return np.array([r[scores][policy.key_for(r)] - r[scores][OFF_KEY] for r in rows], dtype=np.float64)


def summary(rows: Sequence[Row], policy: Policy, scores: str = "n_ssim") -> tuple[float, float, float]:
    """(mean over families of the family's mean benefit, worst family mean, worst case benefit)."""
    if not rows:
        return 0.0, 0.0, 0.0
    gains = benefits(rows, policy, scores)
    fams = np.array([family_of(r["set"]) for r in rows])
    means = [float(gains[fams == f].mean()) for f in sorted(set(fams))]
    return float(np.mean(means)), float(min(means)), float(gains.min())


def ceiling(rows: Sequence[Row], keys: Sequence[str], scores: str = "n_ssim") -> dict[str, float]:
    """What a perfect case-level decision among ``keys`` would gain: per family, the mean over its rows
    of the best key's benefit over networks off (0 where none gains: the oracle keeps the networks off),
    plus 'mean', the average over the families (weighted equally, as :func:`summary`). No policy over
    these keys can beat it, whatever its signals: the upper bound of a case-level trust."""
    if not rows:
        return {"mean": 0.0}
    best = np.array(
        [max([0.0, *(r[scores][k] - r[scores][OFF_KEY] for k in keys if r.get("old_gate", 1.0) > 0.0)]) for r in rows]
    )
    fams = np.array([family_of(r["set"]) for r in rows])
    out = {f: float(best[fams == f].mean()) for f in sorted(set(fams))}
    out["mean"] = float(np.mean(list(out.values())))
    return out


@dataclass
class Search:
    """What :func:`fit` searches: scored keys, signals (with the directions a condition on each may
    take: ``directions[signal]`` ⊆ {True (≥), False (≤)}, both by default), thresholds per signal, free
    conditions per policy, and ``required`` conditions every trusting policy carries (a prior, e.g.
    "never correct a clean stack": noise ≥ the level below which the output filter is off)."""

    keys: tuple[str, ...]
    signals: tuple[str, ...]
    max_thresholds: int = 16  # candidate thresholds per signal: midpoints at evenly spaced quantiles
    max_conditions: int = 2
    directions: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    required: tuple[Condition, ...] = ()

    def sides(self, signal: str) -> tuple[bool, ...]:
        return tuple(self.directions.get(signal, (True, False)))


def _thresholds(values: np.ndarray, count: int) -> np.ndarray:
    """Midpoints between consecutive distinct values, thinned to ``count`` evenly spaced ones."""
    unique = np.unique(values[np.isfinite(values)])
    if unique.size < 2:
        return np.zeros(0)
    mids = (unique[:-1] + unique[1:]) / 2.0
    if mids.size > count:
        mids = mids[np.unique(np.linspace(0, mids.size - 1, count).round().astype(int))]
    return mids


@dataclass
class _Table:
    gains: np.ndarray  # (rows, keys) benefit of each key over networks off
    values: np.ndarray  # (rows, signals)
    gate_ok: np.ndarray  # (rows,) the noise gate lets the networks run
    weights: np.ndarray  # (families, rows): 1/n of the family's rows
    std: np.ndarray  # (signals,)


def _table(rows: Sequence[Row], search: Search, scores: str) -> _Table:
    gains = np.array([[r[scores][k] - r[scores][OFF_KEY] for k in search.keys] for r in rows], dtype=np.float64)
    values = np.array([[float(r["signals"].get(s, np.nan)) for s in search.signals] for r in rows], dtype=np.float64)
    gate_ok = np.array([r.get("old_gate", 1.0) > 0.0 for r in rows])
    fams = [family_of(r["set"]) for r in rows]
    names = sorted(set(fams))
    weights = np.array([[1.0 if f == name else 0.0 for f in fams] for name in names])
    weights /= weights.sum(axis=1, keepdims=True)
    return _Table(gains, values, gate_ok, weights, np.nanstd(values, axis=0))


def _scores(table: _Table, masks: np.ndarray, k: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """For masks (..., rows) of the rows where key k applies: (objective, safe) per mask."""
    gains = np.where(masks & table.gate_ok, table.gains[:, k], 0.0)
    fam = gains @ table.weights.T  # (..., families)
    safe = (gains.min(axis=-1) >= -margin) & (fam.min(axis=-1) >= 0.0)
    return fam.mean(axis=-1), safe


def fit(
    rows: Sequence[Row], search: Search, margin: float = 0.03, buffer: float = 0.25, min_gain: float = 0.002,
    scores: str = "n_ssim",
) -> Policy:
    """The best safe policy on ``rows`` (see the module doc); :data:`OFF` when none gains ``min_gain``.

    Ties go to fewer conditions, then to the key listed first in ``search.keys`` (list milder gates first).
    """
    if not rows:
        return OFF
    table = _table(rows, search, scores)
    cands: list[tuple[float, int, int, Policy]] = []  # (objective, conditions, key order, policy)
    n_sig = len(search.signals)
    thresholds = [_thresholds(table.values[:, j], search.max_thresholds) for j in range(n_sig)]

    base = np.array([all(c.holds(r["signals"]) for c in search.required) for r in rows])
    req = search.required

    def mask(j: int, above: bool, ts: np.ndarray) -> np.ndarray:
        v = table.values[:, j][None, :]
        return ((v >= ts[:, None]) if above else (v <= ts[:, None])) & base

    for k, key in enumerate(search.keys):
        objective, safe = _scores(table, base[None, :], k, margin)
        if safe[0]:
            cands.append((float(objective[0]), 0, k, Policy(key, req)))
        if search.max_conditions >= 1:
            for j in range(n_sig):
                for above in search.sides(search.signals[j]):
                    ts = thresholds[j]
                    if ts.size == 0:
                        continue
                    objective, safe = _scores(table, mask(j, above, ts), k, margin)
                    for i in np.nonzero(safe)[0]:
                        cond = Condition(search.signals[j], above, float(ts[i]))
                        cands.append((float(objective[i]), 1, k, Policy(key, (*req, cond))))
        if search.max_conditions >= 2:
            sided = [(j, a) for j in range(n_sig) for a in search.sides(search.signals[j])]
            for (j1, a1), (j2, a2) in itertools.combinations(sided, 2):
                if j1 == j2 or thresholds[j1].size == 0 or thresholds[j2].size == 0:
                    continue
                m = mask(j1, a1, thresholds[j1])[:, None, :] & mask(j2, a2, thresholds[j2])[None, :, :]
                objective, safe = _scores(table, m, k, margin)
                for i1, i2 in zip(*np.nonzero(safe)):
                    conds = (
                        Condition(search.signals[j1], a1, float(thresholds[j1][i1])),
                        Condition(search.signals[j2], a2, float(thresholds[j2][i2])),
                    )
                    cands.append((float(objective[i1, i2]), 2, k, Policy(key, (*req, *conds))))
    cands.sort(key=lambda c: (-round(c[0], 9), c[1], c[2]))
    for objective, _, _, policy in cands:
        if objective < min_gain:
            break
        if _buffer_safe(rows, policy, table, search, margin, buffer, scores):
            return policy
    return OFF


def _buffer_safe(
    rows: Sequence[Row], policy: Policy, table: _Table, search: Search, margin: float, buffer: float, scores: str
) -> bool:
    """Still safe with every threshold moved ``buffer`` σ of its signal towards trusting more."""
    if buffer <= 0 or not policy.conditions:
        return True
    moved = tuple(
        c
        if c in search.required or c.signal not in search.signals
        else Condition(
            c.signal,
            c.above,
            c.threshold + (-1.0 if c.above else 1.0) * buffer * float(table.std[search.signals.index(c.signal)]),
        )
        for c in policy.conditions
    )
    _, worst_family, worst_case = summary(rows, Policy(policy.key, moved), scores)
    return worst_case >= -margin and worst_family >= 0.0


@dataclass
class Calibration:
    """A channel's shipped policy, the policy fitted on every family, and each family's score under the
    policy fitted without it."""

    policy: Policy  # what ships: ``fitted`` when its leave-one-family-out figures hold, else OFF
    held_out: dict[str, tuple[Policy, np.ndarray]] = field(default_factory=dict)  # family → (policy, gains)
    fitted: Policy = OFF
    search: Search | None = None  # what was searched (for the record)
    fitted_loso: tuple[float, float, float] | None = None  # ``fitted``'s own leave-one-family-out figures (what the guard judged)

    def loso(self) -> tuple[float, float, float]:
        """(mean over families of the held-out mean benefit, worst held-out family mean, worst held-out case)."""
        if not self.held_out:
            return 0.0, 0.0, 0.0
        means = [float(g.mean()) for _, g in self.held_out.values()]
        return float(np.mean(means)), float(min(means)), float(min(g.min() for _, g in self.held_out.values()))


def procedure(rows: Sequence[Row], search: Search, min_gain: float = 0.002, **kwargs: Any) -> Policy:
    """What ships from ``rows``: :func:`fit` at the most expressive level of ``search`` whose
    leave-one-family-out figures on ``rows`` hold (held-out mean gain ≥ ``min_gain``, no held-out family
    below networks off in the mean, no held-out case more than ``margin`` below it), trying
    ``search.max_conditions`` conditions, then fewer, down to a constant factor; else :data:`OFF`.

    Few cases per family make thresholds on signals overfit where a constant factor still generalises:
    the simpler rule is tried before giving up on the networks.
    """
    return _ladder(rows, search, min_gain, **kwargs)[0]


def _ladder(rows: Sequence[Row], search: Search, min_gain: float, **kwargs: Any) -> tuple[Policy, Calibration]:
    """(:func:`procedure`'s policy, the unguarded calibration at the search's full level): the full level
    is the ladder's first step, so neither its fit nor its held-out figures are computed again."""
    margin = kwargs.get("margin", 0.03)
    full: Calibration | None = None
    for conditions in range(search.max_conditions, -1, -1):
        level = replace(search, max_conditions=conditions)
        plain = leave_one_family_out(rows, level, guard=False, min_gain=min_gain, **kwargs)
        full = full or plain
        mean, worst_family, worst_case = plain.loso()
        if plain.fitted != OFF and mean >= min_gain and worst_family >= 0.0 and worst_case >= -margin:
            return plain.fitted, full
    assert full is not None  # max_conditions ≥ 0: at least one level
    return OFF, full


def leave_one_family_out(
    rows: Sequence[Row], search: Search, guard: bool = True, min_gain: float = 0.002, nested: bool = True, **kwargs: Any
) -> Calibration:
    """:func:`fit` on all rows, and per family the policy fitted without it and its gains on it.

    With ``guard`` the policy that ships is :func:`procedure`'s (the most expressive rule level that holds
    up on families it did not see, else networks off); with ``guard`` and ``nested`` each family's
    held-out policy is :func:`procedure` run without it, so the held-out figures are those of what
    would ship without the family. ``fitted`` is always :func:`fit` at the search's full level.
    """
    if guard:
        policy, full = _ladder(rows, search, min_gain, **kwargs)
        out = Calibration(policy, fitted=full.fitted, fitted_loso=full.fitted_loso)
    else:
        fitted = fit(rows, search, min_gain=min_gain, **kwargs)
        out = Calibration(fitted, fitted=fitted)
    scores = kwargs.get("scores", "n_ssim")
    for fam in sorted({family_of(r["set"]) for r in rows}):
        train = [r for r in rows if family_of(r["set"]) != fam]
        held = [r for r in rows if family_of(r["set"]) == fam]
        if guard and nested:
            policy = procedure(train, search, min_gain, **kwargs)
        else:
            policy = fit(train, search, min_gain=min_gain, **kwargs)
        out.held_out[fam] = (policy, benefits(held, policy, scores))
    if not guard:
        out.fitted_loso = out.loso()
    return out
