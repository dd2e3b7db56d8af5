"""Assignment strategies: which modules each client trains this round.

Every strategy returns, for every client, a module set whose predicted cost
under that client's :class:`~fedpilot.core.memory.MemoryModel` is within its
budget, or marks the client infeasible with the reason. They differ only in
*which* feasible set they pick:

- ``fedpilot``: exact knapsack maximising the IG-Score (the paper's method);
- ``random``: a random maximal feasible subset of modules;
- ``fedra``: FedRA's random layer allocation, redrawn every round: the head,
  then whole layers in a random order while they fit (Su et al. 2023, with
  the depth-aware memory model deciding how many layers fit); a client that
  cannot fit one whole layer trains the single modules that fit instead of
  sitting out;
- ``top-down``: the head, then whole layers from the top down while they fit;
- ``uniform``: every client trains the set that the weakest participant can afford;
- ``full``: every module; clients that cannot afford it sit out.
"""

from __future__ import annotations

import operator
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fedpilot.core.knapsack import solve_batch
from fedpilot.core.memory import MemoryModel, WorkerProfile


class Strategy(StrEnum):
    FEDPILOT = "fedpilot"
    RANDOM = "random"
    FEDRA = "fedra"
    TOP_DOWN = "top-down"
    UNIFORM = "uniform"
    FULL = "full"


DEFAULT_STRATEGY = Strategy.FEDRA
"""Random whole layers redrawn every round: 0.025 above the IG-Score knapsack
(``fedpilot``) on BANKING77, 95% interval 0.005 to 0.046 (docs/benchmarks.md,
"The knapsack against random layers"). Jobs, the demo and the CLI read it here."""


@dataclass(frozen=True)
class Client:
    """A participant as assignment sees it: its profile and its module values."""

    name: str
    profile: WorkerProfile
    scores: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    """What one client trains, what it is predicted to cost, and why not if infeasible."""

    client: str
    modules: tuple[str, ...]
    predicted_bytes: int
    value: float
    feasible: bool
    reason: str | None = None


def assign(
    clients: Sequence[Client],
    strategy: Strategy | str,
    *,
    seed: int = 0,
    max_cells: int | None = None,
) -> list[Assignment]:
    """Assign modules to every client with ``strategy`` (results in input order)."""
    strategy = Strategy(strategy)
    if strategy is Strategy.FEDPILOT:
        return _knapsack(clients, max_cells=max_cells)
    if strategy is Strategy.RANDOM:
        rng = random.Random(seed)
        return [_greedy(c, _shuffled(c.profile.memory.module_names, rng)) for c in clients]
    if strategy is Strategy.FEDRA:
        rng = random.Random(seed)
        return [_fedra(c, rng) for c in clients]
    if strategy is Strategy.TOP_DOWN:
        return [_top_down(c) for c in clients]
    if strategy is Strategy.UNIFORM:
        return _uniform(clients, max_cells=max_cells)
    return [_full(c) for c in clients]


def _value(client: Client, names: Sequence[str]) -> float:
    return float(sum(max(0.0, client.scores.get(n, 0.0)) for n in names))


def _infeasible(client: Client, reason: str) -> Assignment:
    memory = client.profile.memory
    return Assignment(client.name, (), memory.base_bytes, 0.0, False, reason)


def _m0_reason(client: Client) -> str:
    return (
        f"cannot hold the frozen model: M0={client.profile.memory.base_bytes} bytes "
        f"> budget {client.profile.budget_bytes} bytes"
    )


def _ordered(memory: MemoryModel, names: Sequence[str]) -> tuple[str, ...]:
    chosen = set(names)
    return tuple(n for n in memory.module_names if n in chosen)


def _knapsack(
    clients: Sequence[Client],
    *,
    max_cells: int | None,
    allowed: Mapping[str, frozenset[str]] | None = None,
) -> list[Assignment]:
    """Exact knapsack per client, batched over clients sharing a memory model."""
    groups: dict[MemoryModel, list[int]] = defaultdict(list)
    for i, c in enumerate(clients):
        groups[c.profile.memory].append(i)
    out: list[Assignment | None] = [None] * len(clients)
    for memory, members in groups.items():
        names = memory.module_names
        values = np.array([_score_row(clients[i].scores, names) for i in members], np.float64)
        if allowed is not None:
            for row, i in enumerate(members):
                permitted = allowed[clients[i].name]
                values[row, [n not in permitted for n in names]] = -np.inf
        budgets = [clients[i].profile.budget_bytes for i in members]
        for i, sol in zip(
            members, solve_batch(memory, budgets, values, max_cells=max_cells), strict=True
        ):
            c = clients[i]
            out[i] = (
                Assignment(c.name, sol.modules, sol.predicted_bytes, sol.value, True)
                if sol.feasible
                else _infeasible(c, _m0_reason(c))
            )
    return [a for a in out if a is not None]


def _score_row(scores: Mapping[str, float], names: Sequence[str]) -> Sequence[float]:
    """``scores`` in ``names`` order, 0 where missing: one C-level lookup per name."""
    try:
        # itemgetter of one name returns a value, not a tuple
        return operator.itemgetter(*names)(scores) if len(names) > 1 else [scores[n] for n in names]
    except KeyError:
        return [scores.get(n, 0.0) for n in names]


def _shuffled(names: Sequence[str], rng: random.Random) -> list[str]:
    order = list(names)
    rng.shuffle(order)
    return order


def _greedy(
    client: Client, order: Sequence[str], *, stop_at_first_misfit: bool = False
) -> Assignment:
    """Add modules in ``order`` while the set stays within budget."""
    profile = client.profile
    if not profile.can_participate:
        return _infeasible(client, _m0_reason(client))
    memory = profile.memory
    chosen: list[str] = []
    weight, low = 0, memory.num_layers + 1  # running sum of p_m + e_m, lowest depth
    for name in order:
        module = memory.module(name)
        depth = min(low, memory.depth(module.layer))
        needed = memory.base_bytes + memory.activation_bytes_from(depth) + weight + module.bytes
        if needed <= profile.budget_bytes:
            chosen.append(name)
            weight, low = weight + module.bytes, depth
        elif stop_at_first_misfit:
            break
    names = _ordered(profile.memory, chosen)
    return Assignment(client.name, names, profile.memory.cost(names), _value(client, names), True)


def _top_down(client: Client) -> Assignment:
    memory = client.profile.memory
    order = sorted(memory.module_names, key=lambda n: -memory.depth(memory.module(n).layer))
    return _greedy(client, order, stop_at_first_misfit=True)


def _fedra(client: Client, rng: random.Random) -> Assignment:
    """The head first, then whole layers in a random order; a layer goes in only whole,
    unless no whole layer fits, when single modules go in in the same order."""
    profile = client.profile
    if not profile.can_participate:
        return _infeasible(client, _m0_reason(client))
    memory = profile.memory
    by_layer: dict[int, list[str]] = defaultdict(list)
    for m in memory.modules:
        by_layer[memory.depth(m.layer)].append(m.name)
    top = max(by_layer)
    head, layers = by_layer[top], [d for d in sorted(by_layer) if d != top]
    rng.shuffle(layers)
    groups = [head, *(by_layer[d] for d in layers)]
    chosen: list[str] = []
    for group in groups:
        if profile.fits([*chosen, *group]):
            chosen += group
    if not chosen:
        # Not even one whole layer fits: train what does, in the same order, rather
        # than sit out with memory for a module or two (as the knapsack would).
        return _greedy(client, [n for group in groups for n in group])
    names = _ordered(memory, chosen)
    return Assignment(client.name, names, memory.cost(names), _value(client, names), True)


def _full(client: Client) -> Assignment:
    profile = client.profile
    names = profile.memory.module_names
    needed = profile.memory.cost(names)
    if needed > profile.budget_bytes:
        return _infeasible(
            client,
            f"training every module needs {needed} bytes > budget {profile.budget_bytes} bytes",
        )
    return Assignment(client.name, names, needed, _value(client, names), True)


def _uniform(clients: Sequence[Client], *, max_cells: int | None) -> list[Assignment]:
    """One module set for everybody: the knapsack of the weakest participant on mean scores."""
    able = [c for c in clients if c.profile.can_participate]
    if not able:
        return [_infeasible(c, _m0_reason(c)) for c in clients]
    weakest = min(
        able, key=lambda c: (c.profile.budget_bytes - c.profile.memory.base_bytes, c.name)
    )
    names = weakest.profile.memory.module_names
    mean_scores = {n: float(np.mean([c.scores.get(n, 0.0) for c in able])) for n in names}
    common = _knapsack([Client(weakest.name, weakest.profile, mean_scores)], max_cells=max_cells)[
        0
    ].modules
    # A client measured with another memory model may not afford the common set:
    # it trains the best part of it that fits, never more than its budget.
    allowed = {c.name: frozenset(common) for c in clients}
    restricted = _knapsack(clients, max_cells=max_cells, allowed=allowed)
    out = []
    for c, a in zip(clients, restricted, strict=True):
        if (
            a.feasible
            and set(common) <= set(c.profile.memory.module_names)
            and c.profile.fits(common)
        ):
            out.append(
                Assignment(c.name, common, c.profile.memory.cost(common), _value(c, common), True)
            )
        else:
            out.append(a)
    return out
