"""The convex, coverage-damped and staleness-aware server steps of STAgg."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpilot.core.aggregation import ClientUpdate, DwaConfig, aggregate
from fedpilot.core.ig_score import ModuleStats


def _module(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "lora_A": (scale * rng.standard_normal((3, 5))).astype(np.float32),
        "lora_B": (scale * rng.standard_normal((4, 3))).astype(np.float32),
    }


def test_the_paper_step_leaves_the_hull_of_a_lone_trainer_and_convex_does_not() -> None:
    # Prepare: one module trained by one client (value 4 from 2) while others are well updated
    g = {"rare": {"w": np.full(3, 2.0, dtype=np.float32)}, "common": {"w": np.zeros(3, np.float32)}}
    stats = {"common": ModuleStats(update_count=30)}
    update = ClientUpdate("a", 10, {"rare": {"w": np.full(3, 4.0, dtype=np.float32)}})

    # Execute
    paper = DwaConfig(gamma=0.5, eta_max=2.0, convex=False, coverage=False)
    loose = aggregate(g, [update], stats, 2, dwa=paper)
    tight = aggregate(g, [update], stats, 2, dwa=replace(paper, convex=True))

    # Assert: the old step overshoots to 6 (2 + 2 * (4 - 2)); the convex one lands on 4
    assert loose.modules["rare"]["w"][0] > 4.0
    np.testing.assert_allclose(tight.modules["rare"]["w"], 4.0)
    assert tight.steps["rare"] == 1.0


@given(st.integers(1, 5), st.integers(0, 10_000), st.floats(0.0, 3.0), st.floats(1.0, 4.0))
def test_convex_steps_stay_between_the_old_value_and_the_average(
    n_clients, seed, gamma, eta_max
) -> None:
    rng = np.random.default_rng(seed)
    g = {f"m{i}": {"w": rng.standard_normal(4).astype(np.float32)} for i in range(3)}
    stats = {n: ModuleStats(update_count=int(rng.integers(0, 20))) for n in g}
    updates = [
        ClientUpdate(
            f"c{i}",
            int(rng.integers(1, 20)),
            {n: {"w": rng.standard_normal(4).astype(np.float32)} for n in g if rng.random() < 0.6},
        )
        for i in range(n_clients)
    ]
    dwa = DwaConfig(gamma=gamma, eta_max=eta_max, convex=True, coverage=True)

    result = aggregate(g, updates, stats, 3, dwa=dwa)

    for name, step in result.steps.items():
        assert 0.0 < step <= 1.0
        trained = [u for u in updates if name in u.modules]
        lo = np.minimum(g[name]["w"], np.min([u.modules[name]["w"] for u in trained], axis=0))
        hi = np.maximum(g[name]["w"], np.max([u.modules[name]["w"] for u in trained], axis=0))
        new = result.modules[name]["w"]
        assert np.all(new >= lo - 1e-5) and np.all(new <= hi + 1e-5)


@given(st.integers(2, 6), st.integers(0, 10_000))
def test_coverage_without_boost_is_fedavg_with_stale_values(n_clients, seed) -> None:
    # Prepare: clients train random subsets of the modules
    rng = np.random.default_rng(seed)
    g = {f"m{i}": _module(rng) for i in range(4)}
    updates = []
    for i in range(n_clients):
        names = [n for n in g if rng.random() < 0.5] or ["m0"]
        updates.append(
            ClientUpdate(f"c{i}", int(rng.integers(1, 40)), {n: _module(rng) for n in names})
        )

    # Execute
    damped = aggregate(g, updates, {}, 1, dwa=DwaConfig(gamma=0.0, coverage=True))
    fedavg = aggregate(g, updates, {}, 1, rule="fedavg")

    # Assert: the share of the round's samples that trained a module is FedAvg's weight
    for name in g:
        for part in g[name]:
            np.testing.assert_allclose(
                damped.modules[name][part], fedavg.modules[name][part], rtol=1e-5, atol=1e-5
            )


def test_coverage_damps_a_module_trained_by_a_small_share() -> None:
    rng = np.random.default_rng(1)
    g = {"m": _module(rng), "n": _module(rng)}
    updates = [
        ClientUpdate("small", 10, {"m": _module(rng, 3.0)}),
        ClientUpdate("big", 90, {"n": _module(rng)}),
    ]
    result = aggregate(g, updates, {}, 1, dwa=DwaConfig(gamma=0.0, coverage=True))
    assert result.steps["m"] == 0.1
    assert result.steps["n"] == 0.9


def test_staleness_scales_the_step_by_the_rounds_a_module_went_untrained() -> None:
    # Prepare: round 5; "old" was last trained in round 1 (3 rounds untrained), "recent" in
    # round 4, "never" not before (4 rounds since the start); gamma 0 leaves only time
    rng = np.random.default_rng(2)
    g = {name: _module(rng) for name in ("old", "recent", "never")}
    stats = {
        "old": ModuleStats(update_count=4, last_round=1),
        "recent": ModuleStats(update_count=4, last_round=4),
    }
    updates = [ClientUpdate("a", 10, {name: _module(rng) for name in g})]

    # Execute
    def steps(staleness: float) -> dict[str, float]:
        dwa = DwaConfig(gamma=0.0, eta_max=4.0, staleness=staleness, convex=False)
        return aggregate(g, updates, stats, 5, dwa=dwa).steps

    boost, damp, off = steps(0.5), steps(-0.5), steps(0.0)

    # Assert: (1 + s) ** staleness, capped at eta_max; 0 is the old step
    assert off == {"old": 1.0, "recent": 1.0, "never": 1.0}
    assert boost["old"] == 2.0 and boost["recent"] == 1.0
    assert abs(boost["never"] - 5**0.5) < 1e-12
    assert damp["old"] == 0.5 and damp["recent"] == 1.0
    assert steps(2.0)["never"] == 4.0  # 25, capped


def test_staleness_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="staleness"):
        DwaConfig(staleness=float("nan"))
    with pytest.raises(ValueError, match="staleness"):
        DwaConfig(staleness=5.0)
