import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedpilot.core.knapsack import brute_force, solve, solve_batch
from fedpilot.core.memory import MemoryModel, ModuleCost
from tests.core.strategies_data import instances


@given(instances(max_modules=16))
def test_exact_solver_equals_brute_force(instance) -> None:
    memory, budget, values = instance
    # Execute
    fast = solve(memory, budget, values)
    reference = brute_force(memory, budget, values)
    # Assert
    assert fast.exact
    assert fast.feasible == reference.feasible
    assert math.isclose(fast.value, reference.value, rel_tol=1e-9, abs_tol=1e-9)
    if fast.feasible:
        assert fast.predicted_bytes == memory.cost(fast.modules) <= budget
        assert math.isclose(fast.value, sum(values[n] for n in fast.modules), abs_tol=1e-9)


@given(instances(max_modules=16), st.integers(1, 8))
def test_coarse_granularity_never_exceeds_the_budget(instance, max_cells) -> None:
    memory, budget, values = instance
    sol = solve(memory, budget, values, max_cells=max_cells)
    assert not sol.feasible or memory.cost(sol.modules) <= budget


def test_batch_matches_single_solves() -> None:
    rng = np.random.default_rng(3)
    memory = MemoryModel(
        10, (7, 5, 3), tuple(ModuleCost(f"m{i}", i % 4, 3 + i, i % 3) for i in range(10))
    )
    budgets = rng.integers(0, memory.full_cost() + 5, size=300)
    values = rng.random((300, 10))
    batch = solve_batch(memory, budgets.tolist(), values)
    for i in range(300):
        single = solve(
            memory, int(budgets[i]), dict(zip(memory.module_names, values[i], strict=True))
        )
        assert math.isclose(batch[i].value, single.value, abs_tol=1e-12)
        assert batch[i].feasible == single.feasible


def test_client_that_cannot_hold_the_model_is_told_why() -> None:
    memory = MemoryModel(500, (1,), (ModuleCost("a", 1, 1),))
    sol = solve(memory, 499, {"a": 1.0})
    assert not sol.feasible
    assert "M0=500" in (sol.reason or "") and "499" in (sol.reason or "")


def test_forbidden_modules_are_never_chosen() -> None:
    memory = MemoryModel(0, (1,), (ModuleCost("a", 1, 1), ModuleCost("b", 1, 1)))
    sol = solve_batch(memory, [100], np.array([[1.0, -np.inf]]))[0]
    assert sol.modules == ("a",)


def test_depth_matters_a_cheaper_high_module_beats_an_expensive_low_one() -> None:
    # Same value and size, but layer 1 needs activations of both layers.
    memory = MemoryModel(0, (50, 10), (ModuleCost("low", 1, 5), ModuleCost("high", 2, 5)))
    sol = solve(memory, 20, {"low": 1.0, "high": 1.0})
    assert sol.modules == ("high",)
    assert sol.predicted_bytes == 15
