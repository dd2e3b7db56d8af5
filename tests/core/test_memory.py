import pytest

from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost, WorkerProfile


def _model() -> MemoryModel:
    return MemoryModel(
        base_bytes=1000,
        layer_activation_bytes=(100, 200, 300),  # a_1, a_2, a_3
        modules=(
            ModuleCost("l1.q", 1, 10, 1),
            ModuleCost("l2.q", 2, 20, 2),
            ModuleCost("l3.q", 3, 30, 3),
            ModuleCost("head", HEAD_LAYER, 40, 4),
        ),
    )


def test_empty_set_costs_only_the_frozen_model() -> None:
    assert _model().cost([]) == 1000


def test_cost_counts_activations_from_the_lowest_trained_layer_up() -> None:
    m = _model()
    # Prepare / Execute / Assert in one line each: low(S) = 2 -> a_2 + a_3.
    assert m.cost(["l3.q"]) == 1000 + 300 + 33
    assert m.cost(["l2.q", "l3.q"]) == 1000 + 200 + 300 + 22 + 33
    assert m.cost(["l1.q", "l3.q"]) == 1000 + 100 + 200 + 300 + 11 + 33


def test_head_alone_backpropagates_through_no_layer() -> None:
    assert _model().cost(["head"]) == 1000 + 44


def test_lower_layers_cost_more_than_higher_ones_of_equal_size() -> None:
    m = MemoryModel(0, (5, 5), (ModuleCost("a", 1, 1), ModuleCost("b", 2, 1)))
    assert m.cost(["a"]) > m.cost(["b"])


def test_duplicate_names_in_a_set_count_once() -> None:
    m = _model()
    assert m.cost(["l3.q", "l3.q"]) == m.cost(["l3.q"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_bytes": -1, "layer_activation_bytes": (), "modules": ()}, "base_bytes"),
        ({"base_bytes": 0, "layer_activation_bytes": (-1,), "modules": ()}, "layer_activation"),
        (
            {"base_bytes": 0, "layer_activation_bytes": (1,), "modules": (ModuleCost("x", 2, 1),)},
            "layer 2",
        ),
        (
            {
                "base_bytes": 0,
                "layer_activation_bytes": (1,),
                "modules": (ModuleCost("x", 1, 1), ModuleCost("x", 1, 1)),
            },
            "duplicate",
        ),
    ],
)
def test_invalid_models_are_rejected_with_the_reason(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryModel(**kwargs)


def test_unknown_module_is_named() -> None:
    with pytest.raises(KeyError, match="nope"):
        _model().cost(["nope"])


def test_profile_knows_when_even_the_frozen_model_does_not_fit() -> None:
    assert not WorkerProfile(_model(), 999).can_participate
    assert WorkerProfile(_model(), 1000).can_participate
