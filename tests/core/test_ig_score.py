import math

import pytest

from fedpilot.core.ig_score import (
    ModuleStats,
    combine,
    global_scores,
    normalise,
    relative_change,
    update_global_scores,
)


def test_normalise_maps_min_to_zero_and_max_to_one() -> None:
    assert normalise({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}


def test_normalise_of_equal_scores_explores_everything() -> None:
    assert normalise({"a": 5.0, "b": 5.0}) == {"a": 1.0, "b": 1.0}


def test_missing_scores_get_the_minimum() -> None:
    assert normalise({"a": 1.0, "b": 3.0}, ["a", "b", "c"])["c"] == 0.0


def test_normalise_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        normalise({"a": math.nan})


def test_combine_mixes_normalised_scores_by_lambda() -> None:
    names = ["a", "b"]
    out = combine({"a": 10.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, 0.25, names)
    assert out == {"a": 0.25, "b": 0.75}


def test_combine_rejects_lambda_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="lambda"):
        combine({}, {}, 1.5, ["a"])


def test_never_trained_modules_score_the_maximum() -> None:
    stats = {"a": ModuleStats(update_count=3, last_round=2, score=0.4), "b": ModuleStats(score=0.1)}
    assert global_scores(stats, ["a", "b", "c"]) == {"a": 0.4, "b": 0.1, "c": 0.4}


def test_global_score_is_an_ema_of_relative_changes() -> None:
    stats = update_global_scores({}, {"a": 1.0}, 1, decay=0.5)
    assert stats["a"].score == 1.0 and stats["a"].last_round == 1
    stats = update_global_scores(stats, {"a": 0.2}, 2, decay=0.5)
    assert stats["a"].score == pytest.approx(0.6)


def test_relative_change_of_a_first_update_from_zero_is_one() -> None:
    assert relative_change(delta_sq_norm=4.0, after_sq_norm=4.0) == pytest.approx(1.0)


def test_first_round_with_only_local_scores_still_values_every_module() -> None:
    """lambda = 1 before any client has reported local scores: all modules stay worth
    training (a zero everywhere would make the knapsack choose nothing)."""
    out = combine({}, {}, 1.0, ["a", "b"])
    assert out == {"a": 1.0, "b": 1.0}
    floored = combine({"a": 1.0, "b": 0.0}, {}, 1.0, ["a", "b"])
    assert floored["b"] > 0 and floored["a"] == 1.0
