"""Client turns on Ray actors give the same rounds as turns in the simulator's process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpilot.cluster import write_csv
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.demo import tier_budgets
from fedpilot.sim import ModelCache, SimOptions, Simulation, VirtualClient
from fedpilot.sim.runners import RayActors
from fedpilot.worker.data import synthetic_dataset

LABELS = ["class0", "class1", "class2"]


def _spec(tiny_dir: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "ray",
            "model": str(tiny_dir),
            "labels": LABELS,
            "rounds": 2,
            "min_workers": 2,
            "local_steps": 2,
            "batch_size": 4,
            "max_seq_len": 16,
            "learning_rate": 0.01,
            "lora": {"rank": 4, "alpha": 8},
            "seed": 5,
        }
    )


def test_ray_actors_train_the_same_global_adapter_as_one_process(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Prepare: 4 clients in the 25/50/100% tiers; one torch thread here and in each actor
    torch.set_num_threads(1)
    spec = _spec(tiny_dir)
    cache = ModelCache()
    memory, _ = cache.profile(spec)
    clients = []
    for i, budget in enumerate(tier_budgets(memory, 4)):
        data = synthetic_dataset(24, len(LABELS), seed=i)
        path = write_csv(tmp_path / f"c{i}.csv", data.texts, [LABELS[y] for y in data.labels])
        clients.append(VirtualClient(f"c{i}", path, budget))
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
