"""The pure round: sampling, last-known scores, planning, and the aggregation order."""

import numpy as np

from fedpilot.core.aggregation import ClientUpdate, DwaConfig, aggregate
from fedpilot.core.ig_score import ModuleStats
from fedpilot.core.memory import MemoryModel, ModuleCost, WorkerProfile
from fedpilot.core.round_plan import (
    Participant,
    fixed_order,
    latest_scores,
    plan_assignments,
    sample_participants,
)


def test_sampling_is_seeded_by_job_and_round_and_keeps_the_given_order() -> None:
    names = [f"w{i:02d}" for i in range(20)]
    a = sample_participants(names, 7, seed=3, number=5)
    assert a == sample_participants(names, 7, seed=3, number=5)
    assert a == sorted(a) and len(set(a)) == 7
    assert a != sample_participants(names, 7, seed=3, number=6)
    assert sample_participants(names, 20, seed=3, number=1) == names


def test_a_client_that_skipped_rounds_keeps_its_last_scores() -> None:
    history = [{"a": {"m": 1.0}, "b": {"m": 2.0}}, {"a": {"m": 3.0}}, {"b": {}}]
    assert latest_scores(history) == {"a": {"m": 3.0}, "b": {"m": 2.0}}


def test_planning_uses_local_scores_within_the_budget() -> None:
    memory = MemoryModel(
        100, (10, 10), (ModuleCost("low", 1, 5), ModuleCost("high", 2, 5), ModuleCost("head", 0, 5))
    )
    budget = memory.cost(["low"])  # low alone fits; low with both others does not
    people = [
        Participant(
            "likes-low", WorkerProfile(memory, budget), {"low": 1.0, "high": 0.0, "head": 0.0}
        ),
        Participant(
            "likes-top", WorkerProfile(memory, budget), {"low": 0.0, "high": 1.0, "head": 1.0}
        ),
    ]
    plans = plan_assignments(people, {}, strategy="fedpilot", ig_lambda=1.0, seed=0, number=1)
    assert [p.client for p in plans] == ["likes-low", "likes-top"]
    assert "low" in plans[0].modules
    assert set(plans[1].modules) == {"high", "head"}
    assert all(p.predicted_bytes <= budget for p in plans)


def test_arrival_order_does_not_change_the_aggregate_bits() -> None:
    rng = np.random.default_rng(0)
    g = {"m": {"w": rng.standard_normal(1000).astype(np.float32)}}
    updates = [
        ClientUpdate(
            f"c{i}",
            int(rng.integers(1, 9)),
            {"m": {"w": rng.standard_normal(1000).astype(np.float32)}},
        )
        for i in range(8)
    ]
    stats = {"m": ModuleStats(update_count=2)}
    first = aggregate(g, fixed_order(updates, key=lambda u: u.client), stats, 1, dwa=DwaConfig())
    shuffled = [updates[i] for i in rng.permutation(len(updates))]
    second = aggregate(g, fixed_order(shuffled, key=lambda u: u.client), stats, 1, dwa=DwaConfig())
    assert np.array_equal(first.modules["m"]["w"], second.modules["m"]["w"])
