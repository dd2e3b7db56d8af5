"""Seeds to conclusions: means with t-intervals, and paired differences against a reference.

Runs of different methods with the same seed share the partition, the initial
adapter and the participant draws, so method differences are compared *paired*
by seed (a paired t-test on the per-seed differences), which removes the
seed-to-seed variation both methods share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as st

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean and the half-width of its two-sided t confidence interval (nan below 2 values)."""

    mean: float
    half: float
    n: int

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "-"
        if math.isnan(self.half):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"

    @property
    def excludes_zero(self) -> bool:
        return not math.isnan(self.half) and abs(self.mean) > self.half


def t_half_width(values: Sequence[float], level: float = LEVEL) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    sd = float(np.std(values, ddof=1))
    return float(st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def estimate(values: Sequence[float], level: float = LEVEL) -> Estimate:
    if not values:
        return Estimate(math.nan, math.nan, 0)
    return Estimate(float(np.mean(values)), t_half_width(values, level), len(values))


@dataclass(frozen=True)
class Paired:
    """Mean of per-seed differences (method - reference), its interval and the paired t-test."""

    diff: Estimate
    p_value: float


def paired(method: Mapping[int, float], reference: Mapping[int, float]) -> Paired | None:
    """Differences over the seeds both have; None when there are none."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        return None
    a = np.array([method[s] for s in seeds])
    b = np.array([reference[s] for s in seeds])
    d = a - b
    p = math.nan
    if len(seeds) >= 2:
        p = 1.0 if np.allclose(d, d[0]) and d[0] == 0 else float(st.ttest_rel(a, b).pvalue)
    return Paired(estimate(d.tolist()), p)


def summarise(
    rows: Sequence[Mapping[str, Any]], reference: str = "fedpilot"
) -> list[dict[str, Any]]:
    """One entry per (setting, method): final and best accuracy over seeds, and the paired
    difference of the final accuracy against ``reference`` in the same setting."""
    done = [r for r in rows if r.get("state") == "done" and r.get("final_accuracy") is not None]
    keys = list(dict.fromkeys((r["setting"], r["method"]) for r in done))
    out = []
    for setting, method in keys:
        mine = [r for r in done if r["setting"] == setting and r["method"] == method]
        ref = [r for r in done if r["setting"] == setting and r["method"] == reference]
        final = {int(r["seed"]): float(r["final_accuracy"]) for r in mine}
        best = {int(r["seed"]): float(r["best_accuracy"]) for r in mine}
        ref_final = {int(r["seed"]): float(r["final_accuracy"]) for r in ref}
        ref_best = {int(r["seed"]): float(r["best_accuracy"]) for r in ref}
        out.append(
            {
                "setting": setting,
                "method": method,
                "kind": mine[0]["kind"],
                "seeds": len(mine),
                "final": estimate(list(final.values())),
                "final_min": min(final.values()),
                "best": estimate(list(best.values())),
                "vs_reference": None if method == reference else paired(final, ref_final),
                "best_vs_reference": None if method == reference else paired(best, ref_best),
                "violations": sum(int(r.get("violations", 0)) for r in mine),
                "wall_s": float(np.mean([r["wall_s"] for r in mine])),
            }
        )
    return out


def learned_threshold(chance: float) -> float:
    """Final accuracy the bound must reach with every seed to count as learning: twice
    chance, or a quarter of the way from chance to 1 where twice chance is out of reach
    or too lax (two or three classes)."""
    return min(2 * chance, chance + (1 - chance) / 4)


def learned(summary: Sequence[Mapping[str, Any]], setting: str, chance: float) -> bool:
    """Whether the unconstrained bound of ``setting`` clearly beat chance with every seed
    (:func:`learned_threshold`). A setting that learned nothing ranks nothing."""
    for s in summary:
        if s["setting"] == setting and s["method"] == "unconstrained":
            return float(s["final_min"]) >= learned_threshold(chance)
    return False


def still_rising(
    rows: Sequence[Mapping[str, Any]], setting: str, window: int = 3, slack: float = 0.02
) -> float | None:
    """The unconstrained bound's mean gain over its last ``window`` rounds in ``setting``
    when it exceeds ``slack`` (the protocol stopped before the bound plateaued), else None."""
    curves = [
        r["accuracy"]
        for r in rows
        if r.get("setting") == setting
        and r.get("method") == "unconstrained"
        and len(r.get("accuracy") or []) > window
    ]
    if not curves:
        return None
    gain = sum(c[-1] - c[-1 - window] for c in curves) / len(curves)
    return gain if gain > slack else None


def above_bound(summary: Sequence[Mapping[str, Any]], setting: str) -> list[str]:
    """Constrained methods whose mean final accuracy exceeds the unconstrained bound's:
    the bound is only an upper bound in expectation, so say where it was not one. Other
    bounds (a stored run of an earlier configuration's bound) are not compared."""
    bound = [s for s in summary if s["setting"] == setting and s["method"] == "unconstrained"]
    if not bound:
        return []
    top = float(bound[0]["final"].mean)
    return [
        s["method"]
        for s in summary
        if s["setting"] == setting and s["kind"] != "bound" and float(s["final"].mean) > top
    ]


def as_json(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A summary entry with its estimates as plain numbers."""

    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 5)

    out: dict[str, Any] = {}
    for k, v in entry.items():
        if isinstance(v, Estimate):
            out[k] = {"mean": num(v.mean), "ci95": num(v.half), "n": v.n}
        elif isinstance(v, Paired):
            out[k] = {
                "diff": num(v.diff.mean),
                "ci95": num(v.diff.half),
                "n": v.diff.n,
                "p": num(v.p_value),
            }
        else:
            out[k] = v
    return out
