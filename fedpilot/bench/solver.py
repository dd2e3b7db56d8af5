"""Assignment speed at scale and optimality against brute force."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from fedpilot.bench.synthetic import encoder_memory, tiered_budgets
from fedpilot.core.knapsack import brute_force, solve
from fedpilot.core.memory import MemoryModel, WorkerProfile
from fedpilot.core.strategies import Client, assign


def run(
    clients: int = 1000,
    layers: int = 12,
    targets: int = 6,
    repeats: int = 5,
    small_instances: int = 200,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    memory = encoder_memory(layers=layers, targets=targets)
    budgets = tiered_budgets(memory, clients, seed)
    rng = np.random.default_rng(seed)
    population = [
        Client(
            f"c{i}",
            WorkerProfile(memory, b),
            dict(zip(memory.module_names, rng.random(len(memory.modules)).tolist(), strict=True)),
        )
        for i, b in enumerate(budgets)
    ]
    for strategy in ("fedpilot", "random", "top-down", "uniform", "full"):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = assign(population, strategy, seed=seed)
            times.append(time.perf_counter() - start)
        best = min(times)
        violations = sum(
            a.feasible and a.predicted_bytes > c.profile.budget_bytes
            for a, c in zip(result, population, strict=True)
        )
        yield {
            "bench": "solver",
            "strategy": strategy,
            "clients": clients,
            "modules": len(memory.modules),
            "seconds": round(best, 5),
            "median_seconds": round(sorted(times)[len(times) // 2], 5),
            "us_per_client": round(best / clients * 1e6, 2),
            "mean_modules": round(float(np.mean([len(a.modules) for a in result])), 2),
            "mean_value": round(float(np.mean([a.value for a in result])), 4),
            "budget_violations": violations,
        }
    yield _optimality(small_instances, seed)


def _small_instance(rng: random.Random) -> tuple[MemoryModel, int]:
    """A 16-module slice of the encoder with budgets anywhere in the feasible range."""
    layers = rng.randint(2, 8)
    memory = encoder_memory(layers=layers, targets=6)
    mods = rng.sample(memory.modules, k=min(16, len(memory.modules)))
    used = max(m.layer for m in mods)
    small = MemoryModel(memory.base_bytes, memory.layer_activation_bytes[:used], tuple(mods))
    budget = rng.randint(small.base_bytes, small.full_cost())
    return small, budget


def _optimality(instances: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    optimal = exact = 0
    gaps = []
    for _ in range(instances):
        memory, budget = _small_instance(rng)
        values = {n: rng.random() for n in memory.module_names}
        fast, reference = solve(memory, budget, values), brute_force(memory, budget, values)
        exact += fast.exact
        if fast.value >= reference.value - 1e-9:
            optimal += 1
        gaps.append((reference.value - fast.value) / reference.value if reference.value else 0.0)
    return {
        "bench": "solver_optimality",
        "instances": instances,
        "modules": 16,
        "optimal_rate": optimal / instances,
        "exact_granularity_rate": exact / instances,
        "mean_gap": round(float(np.mean(gaps)), 6),
        "max_gap": round(float(np.max(gaps)), 6),
    }
