"""A sampled round in which nobody can train: the bench's Exclusive baseline skips it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpilot.demo import tier_budgets
from fedpilot.sim import ModelCache, SimOptions, Simulation
from tests.sim.jobs import synthetic_clients, tiny_spec


@pytest.mark.parametrize("skip", [True, False])
def test_exclusive_without_a_full_budget_client_skips_the_round_or_fails(
    tmp_path: Path, tiny_dir: Path, skip: bool
) -> None:
    spec = tiny_spec(tiny_dir, name="exclusive", strategy="full", seed=3)
    cache = ModelCache()
    memory, _ = cache.profile(spec)
    low, mid, _ = tier_budgets(memory, 3)  # neither fits every module
    clients = synthetic_clients(tmp_path, (low, mid), examples=16)
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
