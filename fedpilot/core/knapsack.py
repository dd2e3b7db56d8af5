"""Exact depth-aware 0/1 knapsack over LoRA modules (DESIGN.md section 2).

For every candidate lowest layer ``k`` the capacity left for module weights is
``C_k = B - M0 - sum_{l >= k} a_l`` and only modules in layers ``>= k`` (plus
the head) may be chosen. Because those module sets are nested, one dynamic
programme that adds modules from the head downwards serves every ``k``: after
adding layer ``k`` we read the best value at capacity ``C_k``. The programme
runs on weights rounded *up* to a granularity ``q`` and capacities rounded
*down*, so every answer is feasible. When ``q`` divides every weight (the
common case: byte counts share large power-of-two factors) the rounding is
lossless and the answer is the true optimum; :attr:`Solution.exact` says which.

Clients that share a :class:`~fedpilot.core.memory.MemoryModel` (same model
configuration) are solved together, vectorised over clients, which is what
makes a thousand clients take milliseconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce

import numpy as np

from fedpilot.core.memory import MemoryModel

MIN_CELLS = 1024
MAX_CELLS = 1 << 16
_WORK = 1 << 24
"""Cells x modules x clients one call may spend; fewer clients get a finer resolution."""


def default_max_cells(n_clients: int, n_modules: int) -> int:
    """Capacity resolution: as fine as the work bound allows, within [MIN_CELLS, MAX_CELLS]."""
    return max(MIN_CELLS, min(MAX_CELLS, _WORK // max(1, n_clients * n_modules)))


@dataclass(frozen=True)
class Solution:
    """Best module subset for one client under its budget."""

    modules: tuple[str, ...]
    predicted_bytes: int
    value: float
    feasible: bool
    exact: bool
    reason: str | None = None


def _granularity(weights: Sequence[int], max_cells: int) -> tuple[int, bool]:
    """Pick ``q``: the weights' gcd when it gives few enough cells, else a coarser step."""
    positive = [w for w in weights if w > 0]
    if not positive:
        return 1, True
    gcd = reduce(math.gcd, positive)
    total = sum(positive)
    if total // gcd <= max_cells:
        return gcd, True
    q = -(-total // max_cells)
    exact = all(w % q == 0 for w in positive)
    return q, exact


def solve_batch(
    memory: MemoryModel,
    budgets: Sequence[int],
    values: np.ndarray,
    *,
    max_cells: int | None = None,
) -> list[Solution]:
    """Solve the knapsack for many clients that share ``memory``.

    ``values[i, j]`` is client ``i``'s value for ``memory.modules[j]``. A value
    of ``-inf`` forbids the module for that client (used by restricted
    strategies); values must otherwise be finite and are clipped at 0, since
    a module worth nothing is never worth its memory.
    """
    n_clients = len(budgets)
    n_modules = len(memory.modules)
    values = np.asarray(values, dtype=np.float64).reshape(n_clients, n_modules)
    if np.isnan(values).any() or np.isposinf(values).any():
        raise ValueError("module values must be finite (or -inf to forbid a module)")
    values = np.where(np.isneginf(values), -np.inf, np.maximum(values, 0.0))

    # Items ordered from the top (head) down, so layers >= k form a prefix.
    order = sorted(range(n_modules), key=lambda j: -memory.depth(memory.modules[j].layer))
    weights = [memory.modules[j].bytes for j in order]
    depths = [memory.depth(memory.modules[j].layer) for j in order]
    if max_cells is None:
        max_cells = default_max_cells(n_clients, n_modules)
    q, exact = _granularity(weights, max_cells)
    budgets_arr = np.asarray(budgets, dtype=np.int64)
    all_cells = max(1, -(-sum(weights) // q))
    w_cells = [-(-w // q) for w in weights]
    # Candidate lowest layers, top first, with the number of items at or above each.
    prefix_ends: list[tuple[int, int]] = []
    j = 0
    for depth in range(memory.num_layers + 1, 0, -1):
        while j < n_modules and depths[j] == depth:
            j += 1
        if depth == memory.num_layers + 1 or depths.count(depth):
            prefix_ends.append((depth, j))
    item_values = values[:, order]

    best_end = np.zeros(n_clients, dtype=np.int64)
    best_cap = np.zeros(n_clients, dtype=np.int64)
    best_value = np.full(n_clients, -np.inf)
    chosen = np.zeros((n_clients, n_modules), dtype=bool)
    # Blocks of clients with similar budgets: a block needs no more cells than
    # its largest capacity, so poorer clients cost less.
    by_budget = np.argsort(budgets_arr, kind="stable")

    def run(lo: int) -> None:
        idx = by_budget[lo : lo + _BLOCK]
        widest = int(budgets_arr[idx].max()) - memory.base_bytes
        cells = max(1, min(all_cells, max(widest, 0) // q))
        value, end, cap = best_value[idx], best_end[idx], best_cap[idx]
        picked = chosen[idx]
        _solve_block(
            memory,
            budgets_arr[idx],
            item_values[idx],
            w_cells,
            q,
            cells,
            prefix_ends,
            value,
            end,
            cap,
            picked,
        )
        best_value[idx], best_end[idx], best_cap[idx], chosen[idx] = value, end, cap, picked

    starts = range(0, n_clients, _BLOCK)
    if len(starts) > 1 and _THREADS > 1:
        # Blocks are independent and numpy releases the GIL in the array loops.
        with ThreadPoolExecutor(max_workers=_THREADS) as pool:
            list(pool.map(run, starts))
    else:
        for lo in starts:
            run(lo)

    depth_arr = np.asarray(depths, dtype=np.int64)
    suffix = np.array(
        [memory.activation_bytes_from(d) for d in range(memory.num_layers + 2)], dtype=np.int64
    )
    lowest = np.where(chosen, depth_arr, memory.num_layers + 1).min(
        axis=1, initial=memory.num_layers + 1
    )
    predicted = memory.base_bytes + suffix[lowest] + chosen @ np.asarray(weights, dtype=np.int64)
    chosen_values = np.where(chosen, item_values, 0.0).sum(axis=1)
    # Chosen flags back in the memory model's module order, so names need no sorting.
    in_model_order = np.empty(n_modules, dtype=np.int64)
    in_model_order[order] = np.arange(n_modules)
    chosen_by_name = chosen[:, in_model_order]
    module_names = memory.module_names

    solutions = []
    for i in range(n_clients):
        if not np.isfinite(best_value[i]):
            solutions.append(
                Solution(
                    modules=(),
                    predicted_bytes=memory.base_bytes,
                    value=0.0,
                    feasible=False,
                    exact=True,
                    reason=(
                        f"base memory M0={memory.base_bytes} bytes exceeds the budget "
                        f"of {int(budgets_arr[i])} bytes"
                    ),
                )
            )
            continue
        solutions.append(
            Solution(
                modules=tuple(module_names[k] for k in np.flatnonzero(chosen_by_name[i])),
                predicted_bytes=int(predicted[i]),
                value=float(chosen_values[i]),
                feasible=True,
                exact=exact,
            )
        )
    return solutions


_BLOCK = 128
"""Clients solved together: keeps one block's programme in the CPU cache."""
_THREADS = min(8, os.cpu_count() or 1)


def _solve_block(
    memory: MemoryModel,
    budgets: np.ndarray,
    item_values: np.ndarray,
    w_cells: list[int],
    q: int,
    cells: int,
    prefix_ends: list[tuple[int, int]],
    best_value: np.ndarray,
    best_end: np.ndarray,
    best_cap: np.ndarray,
    chosen: np.ndarray,
) -> None:
    """Run the programme for one block of clients, writing results into the given views."""
    n_clients, n_items = item_values.shape
    rows = np.arange(n_clients)
    dp = np.zeros((n_clients, cells + 1), dtype=np.float64)
    take = np.zeros((n_items, n_clients, cells + 1), dtype=bool)
    start = 0
    for depth, end in prefix_ends:
        capacity = budgets - memory.base_bytes - memory.activation_bytes_from(depth)
        cap_cells = np.clip(capacity // q, 0, cells)
        if (capacity < 0).all():
            # Deeper prefixes hold more activations, so no client fits any of them.
            break
        # Reads from here on are at this prefix's capacities or below (deeper layers
        # cost activation memory): the programme needs no wider row.
        width = int(cap_cells.max()) + 1
        for j in range(start, end):
            w, v = w_cells[j], item_values[:, j : j + 1]
            if w == 0:
                np.greater(v, 0.0, out=take[j, :, :width])
                dp[:, :width] += np.maximum(v, 0.0)
            elif w < width:
                cand = dp[:, : width - w] + v
                np.greater(cand, dp[:, w:width], out=take[j, :, w:width])
                np.maximum(dp[:, w:width], cand, out=dp[:, w:width])
        start = end
        candidate = np.where(capacity >= 0, dp[rows, cap_cells], -np.inf)
        better = candidate > best_value
        best_value[better] = candidate[better]
        best_end[better] = end
        best_cap[better] = cap_cells[better]

    # Walk the decisions back from each client's winning prefix.
    cap = best_cap.copy()
    for item in range(n_items - 1, -1, -1):
        picked = (item < best_end) & take[item, rows, cap]
        chosen[:, item] = picked
        cap -= picked * w_cells[item]


def solve(
    memory: MemoryModel,
    budget: int,
    values: Mapping[str, float],
    *,
    max_cells: int | None = None,
) -> Solution:
    """Solve the knapsack for one client; modules missing from ``values`` are worth 0."""
    row = np.array([[values.get(m.name, 0.0) for m in memory.modules]], dtype=np.float64)
    return solve_batch(memory, [budget], row, max_cells=max_cells)[0]


def brute_force(memory: MemoryModel, budget: int, values: Mapping[str, float]) -> Solution:
    """Enumerate every subset (reference for tests and the solver bench; ~20 modules at most)."""
    names = memory.module_names
    if len(names) > 22:
        raise ValueError("brute force is limited to 22 modules")
    if memory.base_bytes > budget:
        return Solution((), memory.base_bytes, 0.0, False, True, "M0 exceeds budget")
    best: tuple[float, int, tuple[str, ...]] = (0.0, -memory.base_bytes, ())
    vals = [max(0.0, values.get(n, 0.0)) for n in names]
    for mask in range(1, 1 << len(names)):
        subset = tuple(names[k] for k in range(len(names)) if mask >> k & 1)
        c = memory.cost(subset)
        if c > budget:
            continue
        v = sum(vals[k] for k in range(len(names)) if mask >> k & 1)
        if (v, -c) > best[:2]:
            best = (v, -c, subset)
    return Solution(best[2], -best[1], best[0], True, True)
