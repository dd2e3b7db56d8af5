"""Server momentum: the heavy-ball step from the previous global version."""

import numpy as np
import pytest
from pydantic import ValidationError

from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.aggregation import ClientUpdate, aggregate


def _w(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(3, value, dtype=np.float32)}


def test_momentum_adds_beta_times_the_last_global_change_to_trained_modules_only() -> None:
    # Prepare: "m" moved 1 -> 2 last round; "idle" moved too but nobody trains it now
    previous = {"m": _w(1.0), "idle": _w(0.0)}
    current = {"m": _w(2.0), "idle": _w(5.0)}
    updates = [ClientUpdate("a", 10, {"m": _w(4.0)}), ClientUpdate("b", 30, {"m": _w(0.0)})]

    # Execute
    plain = aggregate(current, updates, {}, 3, rule="fedavg")
    heavy = aggregate(current, updates, {}, 3, rule="fedavg", momentum=0.5, previous=previous)

    # Assert: FedAvg gives 1.0; momentum adds 0.5 * (2 - 1); the idle module stays put
    np.testing.assert_allclose(plain.modules["m"]["w"], 1.0)
    np.testing.assert_allclose(heavy.modules["m"]["w"], 1.5)
    np.testing.assert_array_equal(heavy.modules["idle"]["w"], current["idle"]["w"])


def test_without_a_previous_version_momentum_changes_nothing() -> None:
    current = {"m": _w(2.0)}
    updates = [ClientUpdate("a", 10, {"m": _w(4.0)})]

    plain = aggregate(current, updates, {}, 1)
    first = aggregate(current, updates, {}, 1, momentum=0.9, previous=None)

    np.testing.assert_array_equal(plain.modules["m"]["w"], first.modules["m"]["w"])


def test_a_previous_version_of_another_shape_is_refused_by_name() -> None:
    updates = [ClientUpdate("a", 10, {"m": _w(4.0)})]
    previous = {"m": {"w": np.zeros(4, np.float32)}}

    with pytest.raises(ValueError, match=r"'m'.*shape"):
        aggregate({"m": _w(2.0)}, updates, {}, 2, momentum=0.5, previous=previous)


@pytest.mark.parametrize("beta", [-0.1, 1.0, float("nan")])
def test_momentum_out_of_range_is_refused(beta: float) -> None:
    with pytest.raises(ValueError, match="momentum"):
        aggregate({"m": _w(2.0)}, [], {}, 1, momentum=beta)


def test_momentum_needs_the_factors_merge() -> None:
    with pytest.raises(ValueError, match="factors"):
        aggregate({"m": _w(2.0)}, [], {}, 1, merge="exact", momentum=0.5)
    with pytest.raises(ValidationError, match="momentum"):
        JobSpec.model_validate({"aggregation": {"merge": "exact", "momentum": 0.5}})
    with pytest.raises(ValidationError, match="momentum"):
        JobSpec.model_validate({"aggregation": {"momentum": 0.99}})


def test_restart_drops_momentum_where_the_step_turns_against_the_last_change() -> None:
    # Prepare: "back" moved 1 -> 2 and clients now pull it down to 1; "on" moved
    # 1 -> 2 and clients pull it further up to 4
    previous = {"back": _w(1.0), "on": _w(1.0)}
    current = {"back": _w(2.0), "on": _w(2.0)}
    updates = [ClientUpdate("a", 10, {"back": _w(1.0), "on": _w(4.0)})]

    # Execute
    kept = aggregate(current, updates, {}, 3, rule="fedavg", momentum=0.5, previous=previous)
    restarted = aggregate(
        current, updates, {}, 3, rule="fedavg", momentum=0.5, previous=previous, restart=True
    )

    # Assert: without restart both carry +0.5; with it only the module still
    # moving the same way does, and the result names the one that restarted
    np.testing.assert_allclose(kept.modules["back"]["w"], 1.5)
    np.testing.assert_allclose(restarted.modules["back"]["w"], 1.0)
    np.testing.assert_allclose(restarted.modules["on"]["w"], 4.5)
    assert restarted.restarted == ("back",)
    assert kept.restarted == ()


def test_restart_is_a_job_spec_field_on_by_default() -> None:
    assert JobSpec().aggregation.restart is True
    assert not JobSpec.model_validate({"aggregation": {"restart": False}}).aggregation.restart
    with pytest.raises(ValidationError, match="restart"):
        JobSpec.model_validate({"aggregation": {"restart": "sometimes"}})
