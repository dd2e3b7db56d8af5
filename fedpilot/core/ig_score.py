"""IG-Score: the value of training a module (DESIGN.md section 2).

``v_im = lambda * local_im + (1 - lambda) * global_m``, both normalised to
``[0, 1]`` over the modules. ``local`` comes from each worker (empirical
Fisher on its own probe batches); ``global`` is kept here, by the coordinator,
from how much each module's product ``B A`` moved in past rounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

DEFAULT_EMA_DECAY = 0.7
"""Weight of the previous global score in the moving average."""


def normalise(scores: Mapping[str, float], names: Iterable[str] | None = None) -> dict[str, float]:
    """Min-max normalise ``scores`` to ``[0, 1]`` over ``names`` (default: the score keys).

    Missing names score the minimum. When every score is equal nothing
    distinguishes the modules, so all get 1.0 (explore everything).
    """
    keys = list(scores) if names is None else list(names)
    raw = {n: float(scores.get(n, -math.inf)) for n in keys}
    if any(math.isnan(v) or v == math.inf for v in raw.values()):
        raise ValueError("scores must be finite numbers")
    present = [v for v in raw.values() if v != -math.inf]
    if not present:
        return dict.fromkeys(keys, 1.0)
    lo, hi = min(present), max(present)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return {n: (1.0 if v != -math.inf else 0.0) for n, v in raw.items()}
    return {n: (0.0 if v == -math.inf else (v - lo) / (hi - lo)) for n, v in raw.items()}


def combine(
    local: Mapping[str, float],
    global_: Mapping[str, float],
    lam: float,
    names: Iterable[str],
) -> dict[str, float]:
    """IG-Score of every module in ``names``: normalised local and global mixed by ``lam``.

    A client with no local scores yet (its first round) counts every module as equally
    informative, as the global side does before any history. Scores are floored at
    :data:`SCORE_FLOOR`: min-max normalisation gives the least informative module 0,
    and a knapsack would then leave it out even where it fits for free.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    keys = list(names)
    local_n = normalise(local, keys) if local else dict.fromkeys(keys, 1.0)
    global_n = normalise(global_, keys) if global_ else dict.fromkeys(keys, 1.0)
    return {n: max(SCORE_FLOOR, lam * local_n[n] + (1.0 - lam) * global_n[n]) for n in keys}


SCORE_FLOOR = 1e-3


@dataclass(frozen=True)
class ModuleStats:
    """Server-side history of one module."""

    update_count: int = 0
    """Client updates received so far (``u_m`` in DWA)."""
    last_round: int | None = None
    """Last round in which at least one client trained the module."""
    score: float | None = None
    """EMA of the relative change of ``B A``; None until the module is first trained."""


def relative_change(delta_sq_norm: float, after_sq_norm: float) -> float:
    """``||Delta(BA)||_F / (||BA||_F + eps)`` with the *new* product in the denominator.

    The new product keeps the first update of a zero-initialised LoRA module
    (``B = 0`` so ``BA = 0`` before) at a finite 1.0 instead of ``1/eps``.
    """
    eps = 1e-12
    return math.sqrt(max(delta_sq_norm, 0.0)) / (math.sqrt(max(after_sq_norm, 0.0)) + eps)


def update_global_scores(
    stats: Mapping[str, ModuleStats],
    changes: Mapping[str, float],
    round_number: int,
    *,
    decay: float = DEFAULT_EMA_DECAY,
) -> dict[str, ModuleStats]:
    """Fold this round's relative changes into the moving averages (pure: returns new stats)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    out = dict(stats)
    for name, change in changes.items():
        if not math.isfinite(change) or change < 0:
            raise ValueError(f"relative change of {name!r} must be finite and >= 0, got {change}")
        old = out.get(name, ModuleStats())
        score = change if old.score is None else decay * old.score + (1.0 - decay) * change
        out[name] = replace(old, score=score, last_round=round_number)
    return out


def global_scores(stats: Mapping[str, ModuleStats], names: Iterable[str]) -> dict[str, float]:
    """Raw global score per module; a module never trained scores the maximum of all."""
    keys = list(names)
    known = [s.score for n in keys if (s := stats.get(n)) is not None and s.score is not None]
    top = max(known, default=1.0)
    out = {}
    for n in keys:
        s = stats.get(n)
        out[n] = top if s is None or s.score is None else s.score
    return out
