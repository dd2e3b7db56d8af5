"""HetLoRA and FlexLoRA pieces: truncation, rank from budget, padded and SVD aggregation."""

import numpy as np
import pytest

from fedpilot.core.hetero_rank import (
    RankedUpdate,
    aggregate_flexlora,
    aggregate_hetlora,
    prune_rank,
    rank_for_budget,
    rank_memory,
    truncate,
)
from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost

R = 4


def _lora(rng: np.random.Generator, rank: int = R) -> dict[str, np.ndarray]:
    a = rng.standard_normal((R, 6)).astype(np.float32)
    b = rng.standard_normal((5, R)).astype(np.float32)
    return truncate({"lora_A": a, "lora_B": b}, rank)


def test_truncation_zeroes_the_components_beyond_the_rank() -> None:
    m = _lora(np.random.default_rng(0), rank=2)
    assert not m["lora_A"][2:].any() and not m["lora_B"][:, 2:].any()
    assert m["lora_A"][:2].any() and m["lora_B"][:, :2].any()
    with pytest.raises(ValueError, match="rank"):
        truncate(m, 0)


def test_rank_from_budget_scales_lora_parameters_but_not_activations_or_head() -> None:
    memory = MemoryModel(
        1000,
        (100, 100),
        (
            ModuleCost("l1", 1, 80, 10),
            ModuleCost("l2", 2, 80, 10),
            ModuleCost("head", HEAD_LAYER, 40, 0),
        ),
    )
    half = rank_memory(memory, 2, R)
    assert half.module("l1").param_bytes == 40 and half.module("head").param_bytes == 40
    assert half.layer_activation_bytes == memory.layer_activation_bytes
    assert rank_for_budget(memory, memory.full_cost(), R) == R
    assert rank_for_budget(memory, half.full_cost(), R) == 2
    assert rank_for_budget(memory, rank_memory(memory, 1, R).full_cost() - 1, R) == 0


def test_hetlora_zero_pads_lower_rank_clients_with_norm_weights() -> None:
    rng = np.random.default_rng(1)
    g = {"m": _lora(rng)}
    low, high = _lora(rng, rank=1), _lora(rng, rank=R)
    updates = [RankedUpdate("a", 10, 1, {"m": low}), RankedUpdate("b", 10, R, {"m": high})]

    out = aggregate_hetlora(g, updates)

    w_low = 10 * np.linalg.norm(low["lora_B"] @ low["lora_A"])
    w_high = 10 * np.linalg.norm(high["lora_B"] @ high["lora_A"])
    expected = (w_low * low["lora_A"] + w_high * high["lora_A"]) / (w_low + w_high)
    np.testing.assert_allclose(out["m"]["lora_A"], expected, rtol=1e-5)
    # rows beyond rank 1 come from the high-rank client only, diluted by the zero padding
    np.testing.assert_allclose(
        out["m"]["lora_A"][1:], high["lora_A"][1:] * w_high / (w_low + w_high), rtol=1e-5
    )


def test_flexlora_averages_products_and_returns_the_best_rank_r_factors() -> None:
    rng = np.random.default_rng(2)
    g = {"m": _lora(rng), "head": {"weight": np.zeros((3, 2), np.float32)}}
    ups = [
        RankedUpdate(
            "a", 30, 2, {"m": _lora(rng, 2), "head": {"weight": np.ones((3, 2), np.float32)}}
        ),
        RankedUpdate(
            "b", 10, R, {"m": _lora(rng, R), "head": {"weight": np.zeros((3, 2), np.float32)}}
        ),
    ]

    out = aggregate_flexlora(g, ups)

    full = (
        sum(u.num_samples * (u.modules["m"]["lora_B"] @ u.modules["m"]["lora_A"]) for u in ups) / 40
    )
    u_, s, vt = np.linalg.svd(full)
    best = (u_[:, :R] * s[:R]) @ vt[:R]
    np.testing.assert_allclose(out["m"]["lora_B"] @ out["m"]["lora_A"], best, atol=1e-4)
    np.testing.assert_allclose(out["head"]["weight"], 0.75)
    # A client of rank 2 takes the first two singular components: the best rank-2 product
    two = truncate(out["m"], 2)
    np.testing.assert_allclose(
        two["lora_B"] @ two["lora_A"], (u_[:, :2] * s[:2]) @ vt[:2], atol=1e-4
    )


def test_self_pruning_drops_a_negligible_last_component_only() -> None:
    rng = np.random.default_rng(3)
    m = _lora(rng)
    m["lora_B"][:, R - 1] *= 1e-4
    assert prune_rank({"m": m}, R, 0.05) == R - 1
    assert prune_rank({"m": _lora(rng)}, R, 0.05) == R
    assert prune_rank({"m": m}, 1, 0.05) == 1


def test_bad_updates_are_refused_with_the_client_named() -> None:
    rng = np.random.default_rng(4)
    g = {"m": _lora(rng)}
    bad = {"lora_A": np.full((R, 6), np.nan, np.float32), "lora_B": np.zeros((5, R), np.float32)}
    with pytest.raises(ValueError, match="'x'"):
        aggregate_hetlora(g, [RankedUpdate("x", 5, R, {"m": bad})])
    with pytest.raises(ValueError, match="no updates"):
        aggregate_flexlora(g, [])
