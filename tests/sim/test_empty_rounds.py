"""A sampled round in which nobody can train: the bench's Exclusive baseline skips it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpilot.cluster import write_csv
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.demo import tier_budgets
from fedpilot.sim import ModelCache, SimOptions, Simulation, VirtualClient
from fedpilot.worker.data import synthetic_dataset

LABELS = ["class0", "class1", "class2"]


@pytest.mark.parametrize("skip", [True, False])
def test_exclusive_without_a_full_budget_client_skips_the_round_or_fails(
    tmp_path: Path, tiny_dir: Path, skip: bool
) -> None:
    spec = JobSpec.model_validate(
        {
            "name": "exclusive",
            "model": str(tiny_dir),
            "labels": LABELS,
            "rounds": 2,
            "min_workers": 2,
            "local_steps": 2,
            "batch_size": 4,
            "max_seq_len": 16,
            "strategy": "full",
            "lora": {"rank": 4, "alpha": 8},
            "seed": 3,
        }
    )
    cache = ModelCache()
    memory, _ = cache.profile(spec)
    low, mid, _ = tier_budgets(memory, 3)  # neither fits every module
    clients = []
    for i, budget in enumerate((low, mid)):
        data = synthetic_dataset(16, len(LABELS), seed=i)
        path = write_csv(tmp_path / f"c{i}.csv", data.texts, [LABELS[y] for y in data.labels])
        clients.append(VirtualClient(f"c{i}", path, budget))
    sim = Simulation(spec, clients, options=SimOptions(skip_empty_rounds=skip), cache=cache)
    if not skip:
        with pytest.raises(RuntimeError, match="no client could train any module"):
            sim.run()
        return
    result = sim.run()
    assert [r.modules for r in result.rounds] == [{}, {}]
    start = Simulation(spec, clients, cache=cache)
    from fedpilot.core.initial import initial_adapter

    first = initial_adapter(start.shapes, seed=spec.seed)
    for name, parts in first.items():
        for part, x in parts.items():
            np.testing.assert_array_equal(result.adapter[name][part], x)
