"""The global adapter's shapes: bounded by the model and the spec, agreed by participants."""

from __future__ import annotations

import pytest

from fedpilot.coordinator.adapter_shapes import (
    AdapterBounds,
    agreed_shapes,
    check_shapes,
    first_difference,
    model_max_dim,
)
from fedpilot.wire import WireError

BOUNDS = AdapterBounds(
    rank=4, target_modules=("query", "value"), max_dim=1536, max_bytes=1 << 20, max_tensors=100
)
HONEST = {
    "encoder.layer.0.attention.self.query/lora_A": [4, 384],
    "encoder.layer.0.attention.self.query/lora_B": [384, 4],
    "classifier/weight": [3, 384],
    "classifier/bias": [3],
}


def test_the_models_config_bounds_every_dimension() -> None:
    assert model_max_dim({"hidden_size": 384, "intermediate_size": 1536}, 9) == 4 * 1536
    assert model_max_dim({"text_config": {"hidden_size": 64}}, 9) == 256
    assert model_max_dim(None, 9) == 9 and model_max_dim({"hidden_size": True}, 9) == 9


def test_honest_shapes_pass() -> None:
    check_shapes(HONEST, BOUNDS)


@pytest.mark.parametrize(
    ("name", "shape", "why"),
    [
        ("encoder.layer.0.attention.self.query/lora_A", [8, 384], "rank is 4"),
        ("encoder.layer.0.attention.self.query/lora_B", [384, 4, 1], "rank is 4"),
        ("encoder.layer.0.attention.self.key/lora_A", [4, 384], "target modules"),
        ("classifier/weight", [3, 10**7], "the model's largest"),
        ("classifier/weight", [0, 384], "the model's largest"),
        ("classifier/weight", [1, 1, 1, 1, 1], "1 to 4 dimensions"),
        ("classifier/huge", [1536, 1536], "max_adapter_bytes"),
    ],
)
def test_a_shape_the_model_or_spec_cannot_have_is_named(name, shape, why) -> None:
    with pytest.raises(WireError, match=why) as e:
        check_shapes({**HONEST, name: shape}, BOUNDS)
    assert e.value.field == f"profile.tensors[{name}]"


def test_too_many_tensors_are_refused() -> None:
    many = {f"classifier/t{i}": [1] for i in range(101)}
    with pytest.raises(WireError, match="at most 100"):
        check_shapes(many, BOUNDS)


def test_the_majority_decides_and_a_tie_goes_to_the_smaller_adapter() -> None:
    bigger = {**HONEST, "classifier/weight": [6, 384], "classifier/bias": [6]}
    assert agreed_shapes([HONEST, bigger, HONEST]) == HONEST
    assert agreed_shapes([bigger, HONEST]) == HONEST
    assert agreed_shapes([HONEST, bigger]) == HONEST
    assert agreed_shapes([bigger, bigger, HONEST]) == bigger
    with pytest.raises(ValueError):
        agreed_shapes([])


def test_the_first_difference_is_named() -> None:
    assert first_difference(HONEST, HONEST) is None
    assert "classifier/bias" in first_difference({**HONEST, "classifier/bias": [4]}, HONEST)
    assert "not a tensor" in first_difference({**HONEST, "x/y": [1]}, HONEST)
    missing = dict(HONEST)
    del missing["classifier/bias"]
    assert "missing" in first_difference(missing, HONEST)
