"""Client turns on Ray actors give the same rounds as turns in the simulator's process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpilot.demo import tier_budgets
from fedpilot.sim import ModelCache, SimOptions, Simulation
from fedpilot.sim.runners import RayActors
from tests.sim.jobs import synthetic_clients, tiny_spec


def test_ray_actors_train_the_same_global_adapter_as_one_process(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Prepare: 4 clients in the 25/50/100% tiers; one torch thread here and in each actor
    torch.set_num_threads(1)
    spec = tiny_spec(tiny_dir, name="ray", learning_rate=0.01, seed=5)
    cache = ModelCache()
    memory, _ = cache.profile(spec)
    clients = synthetic_clients(tmp_path, tier_budgets(memory, 4), examples=24)
    options = SimOptions(probe_examples=4)
    runner = RayActors(actors=2, threads=1)

    # Execute
    here = Simulation(spec, clients, options=options, cache=cache).run()
    try:
        there = Simulation(spec, clients, options=options, cache=cache, runner=runner).run()
    finally:
        runner.close()

    # Assert: two other processes trained, and the rounds match
    assert len(runner.actor_pids) == 2 and os.getpid() not in runner.actor_pids
    assert [r.modules for r in there.rounds] == [r.modules for r in here.rounds]
    assert sum(len(r.modules) for r in here.rounds) >= 4
    for a, b in zip(here.rounds, there.rounds, strict=True):
        assert a.num_samples == b.num_samples
        assert abs(a.loss_after - b.loss_after) < 1e-6
    for name, parts in here.adapter.items():
        for part, x in parts.items():
            np.testing.assert_allclose(there.adapter[name][part], x, rtol=0, atol=1e-6)
    changed = [
        name
        for name, parts in here.adapter.items()
        if any(np.abs(x).max() > 0 for p, x in parts.items() if p == "lora_B")
    ]
    assert changed, "training moved no LoRA B factor away from zero"


def test_a_runner_needs_an_actor() -> None:
    with pytest.raises(ValueError, match="actors"):
        RayActors(actors=0)
