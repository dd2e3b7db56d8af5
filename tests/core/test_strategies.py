import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpilot.core.memory import MemoryModel, ModuleCost, WorkerProfile
from fedpilot.core.strategies import Client, Strategy, assign
from tests.core.strategies_data import memory_models


@st.composite
def populations(draw: st.DrawFn) -> list[Client]:
    # Two memory models in one population: workers may measure different numbers.
    models = [draw(memory_models(max_modules=10)), draw(memory_models(max_modules=10))]
    clients = []
    for i in range(draw(st.integers(1, 8))):
        memory = models[draw(st.integers(0, 1))]
        budget = draw(st.integers(0, memory.full_cost() + 30))
        scores = {n: draw(st.floats(0, 1)) for n in memory.module_names}
        clients.append(Client(f"c{i}", WorkerProfile(memory, budget), scores))
    return clients


@given(populations(), st.sampled_from(list(Strategy)), st.integers(0, 3))
def test_no_strategy_ever_exceeds_a_budget(clients, strategy, seed) -> None:
    result = assign(clients, strategy, seed=seed)
    assert [a.client for a in result] == [c.name for c in clients]
    for a, c in zip(result, clients, strict=True):
        if a.feasible:
            assert a.predicted_bytes == c.profile.memory.cost(a.modules) <= c.profile.budget_bytes
        else:
            assert a.modules == () and a.reason


@given(populations())
def test_fedpilot_is_at_least_as_valuable_as_every_other_strategy(clients) -> None:
    best = assign(clients, "fedpilot")
    for strategy in ("random", "top-down", "uniform", "full"):
        for ours, theirs in zip(best, assign(clients, strategy), strict=True):
            assert ours.value >= theirs.value - 1e-9


def _tiers() -> list[Client]:
    memory = MemoryModel(
        100,
        (10, 10, 10),
        tuple(ModuleCost(f"l{layer}.{t}", layer, 5, 0) for layer in (1, 2, 3) for t in "qv"),
    )
    budgets = [
        memory.cost(["l3.q", "l3.v"]),
        memory.cost(["l2.q", "l3.q"]) + 10,
        memory.full_cost(),
    ]
    return [Client(f"c{i}", WorkerProfile(memory, b), {}) for i, b in enumerate(budgets)]


def test_full_lets_only_clients_that_fit_everything_take_part() -> None:
    result = assign(_tiers(), "full")
    assert [a.feasible for a in result] == [False, False, True]
    assert "budget" in (result[0].reason or "")


def test_uniform_gives_everybody_the_weakest_clients_set() -> None:
    clients = [Client(c.name, c.profile, {"l3.q": 1.0, "l3.v": 0.5}) for c in _tiers()]
    result = assign(clients, "uniform")
    assert {a.modules for a in result} == {("l3.q", "l3.v")}


def test_top_down_fills_from_the_top_layer() -> None:
    result = assign(_tiers(), "top-down")
    assert result[0].modules == ("l3.q", "l3.v")
    assert result[2].modules == tuple(_tiers()[2].profile.memory.module_names)


def test_random_is_deterministic_by_seed() -> None:
    clients = _tiers()
    assert assign(clients, "random", seed=7) == assign(clients, "random", seed=7)


def test_fedra_takes_whole_layers_in_an_order_redrawn_each_round() -> None:
    from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost, WorkerProfile
    from fedpilot.core.strategies import Client, assign

    modules = [ModuleCost("head", HEAD_LAYER, 5)] + [
        ModuleCost(f"l{layer}.{t}", layer, 5) for layer in range(1, 7) for t in ("q", "v")
    ]
    memory = MemoryModel(100, (1,) * 6, tuple(modules))
    budget = memory.cost(["head", "l5.q", "l5.v", "l6.q", "l6.v"])
    client = Client("c", WorkerProfile(memory, budget))

    draws = {assign([client], "fedra", seed=s)[0].modules for s in range(20)}

    for chosen in draws:
        assert "head" in chosen and memory.cost(chosen) <= budget
        layers = {n.split(".")[0] for n in chosen if n != "head"}
        for layer in layers:  # a layer goes in whole
            assert {f"{layer}.q", f"{layer}.v"} <= set(chosen)
    assert len(draws) > 1


def test_fedra_trains_single_modules_where_no_whole_layer_fits() -> None:
    # Arrange: room for one module of the top layer, not for both, nor for a lower one
    memory = _tiers()[0].profile.memory
    budget = memory.cost(["l3.q"])
    assert not WorkerProfile(memory, budget).fits(["l3.q", "l3.v"])
    client = Client("c", WorkerProfile(memory, budget))

    # Execute
    (a,) = assign([client], "fedra", seed=0)

    # Assert: it trains what fits instead of sitting out
    assert a.feasible and a.modules == ("l3.q",) and a.predicted_bytes <= budget


@pytest.mark.parametrize(
    ("scores", "names", "row"),
    [
        ({"a": 0.5, "b": 0.25}, ["b", "a"], [0.25, 0.5]),
        ({"a": 0.5}, ["a"], [0.5]),
        ({"a": 0.5}, ["a", "missing"], [0.5, 0.0]),
        ({}, [], []),
    ],
)
def test_score_rows_follow_the_module_order_with_zero_for_missing(scores, names, row) -> None:
    from fedpilot.core.strategies import _score_row

    assert list(_score_row(scores, names)) == row
