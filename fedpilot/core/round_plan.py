"""The pure part of a round: who takes part, what each trains, in which order updates merge.

The coordinator's round driver and the simulator (``fedpilot.sim``) both call
these functions, so a simulated run and a run of real processes make the same
decisions from the same inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fedpilot.core.ig_score import ModuleStats, combine, global_scores
from fedpilot.core.memory import WorkerProfile
from fedpilot.core.strategies import Assignment, Client, Strategy, assign

T = TypeVar("T")


def sample_participants(candidates: Sequence[T], want: int, seed: int, number: int) -> list[T]:
    """``want`` of ``candidates`` for round ``number``, seeded by the job seed and the round.

    ``candidates`` must come in a stable order (e.g. sorted by name): the draw depends
    on it. The sample keeps that order.
    """
    if not 0 <= want <= len(candidates):
        raise ValueError(f"cannot sample {want} of {len(candidates)} participants")
    rng = random.Random(seed * 1_000_003 + number)
    chosen = set(rng.sample(range(len(candidates)), want))
    return [c for i, c in enumerate(candidates) if i in chosen]


def latest_scores(
    history: Iterable[Mapping[str, Mapping[str, float]]],
) -> dict[str, Mapping[str, float]]:
    """Each client's last non-empty local scores over rounds given oldest first.

    A client that skipped a round (not sampled, straggler, refused) keeps what it
    reported earlier instead of falling back to "every module equally informative".
    """
    out: dict[str, Mapping[str, float]] = {}
    for by_client in history:
        for client, scores in by_client.items():
            if scores:
                out[client] = scores
    return out


@dataclass(frozen=True)
class Participant:
    """A client as the round sees it: its memory profile and its latest local scores."""

    name: str
    profile: WorkerProfile
    local_scores: Mapping[str, float]


def plan_assignments(
    participants: Sequence[Participant],
    stats: Mapping[str, ModuleStats],
    *,
    strategy: Strategy | str,
    ig_lambda: float,
    seed: int,
    number: int,
) -> list[Assignment]:
    """IG-Scores (local mixed with global) and the strategy's module sets, in input order."""
    clients = []
    for p in participants:
        names = p.profile.memory.module_names
        scores = combine(p.local_scores, global_scores(stats, names), ig_lambda, names)
        clients.append(Client(p.name, p.profile, scores))
    return assign(clients, strategy, seed=seed + number)


def fixed_order(items: Iterable[T], key: Callable[[T], str | tuple[str, ...]]) -> list[T]:
    """Updates in the order they are folded into the aggregate: by a stable client key,
    never by arrival, so the same round gives the same global adapter bits."""
    return sorted(items, key=key)
