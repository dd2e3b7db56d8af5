from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpilot.core.aggregation import (
    Aggregator,
    ClientUpdate,
    DwaConfig,
    UpdateError,
    aggregate,
    product,
)
from fedpilot.core.ig_score import ModuleStats

RANK, D_IN, D_OUT = 4, 6, 5


def _module(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "lora_A": rng.standard_normal((RANK, D_IN)).astype(np.float32),
        "lora_B": rng.standard_normal((D_OUT, RANK)).astype(np.float32),
    }


def _global(rng: np.random.Generator, names=("m1", "m2", "m3")) -> dict[str, dict[str, np.ndarray]]:
    return {n: _module(rng) for n in names}


@given(st.integers(1, 6), st.integers(0, 10_000))
def test_stagg_equals_fedavg_when_everybody_trains_everything(n_clients, seed) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    g = _global(rng)
    updates = [
        ClientUpdate(f"c{i}", int(rng.integers(1, 50)), {n: _module(rng) for n in g})
        for i in range(n_clients)
    ]
    # Execute
    stagg = aggregate(g, updates, {}, 1, dwa=DwaConfig(eta=1.0, gamma=0.0))
    fedavg = aggregate(g, updates, {}, 1, rule="fedavg")
    # Assert: both are the sample-weighted mean of the factors.
    total = sum(u.num_samples for u in updates)
    for name in g:
        for part in ("lora_A", "lora_B"):
            expected = sum(u.num_samples * u.modules[name][part] for u in updates) / total
            np.testing.assert_allclose(stagg.modules[name][part], expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(fedavg.modules[name][part], expected, rtol=1e-5, atol=1e-5)


def test_untrained_modules_keep_their_values_and_stats() -> None:
    rng = np.random.default_rng(0)
    g = _global(rng)
    stats = {"m3": ModuleStats(update_count=4, last_round=2, score=0.3)}
    result = aggregate(g, [ClientUpdate("a", 10, {"m1": _module(rng)})], stats, 3)
    for name in ("m2", "m3"):
        for part in g[name]:
            assert np.array_equal(result.modules[name][part], g[name][part])
    assert result.stats["m3"] == stats["m3"]
    assert result.stats["m1"].update_count == 1 and result.stats["m1"].last_round == 3


@given(
    st.lists(
        st.tuples(st.integers(1, 100), st.sets(st.sampled_from(["m1", "m2", "m3"]), min_size=1)),
        min_size=1,
        max_size=8,
    )
)
def test_per_module_weights_sum_to_one_over_the_clients_that_trained_it(plan) -> None:
    rng = np.random.default_rng(1)
    g = _global(rng)
    updates = [
        ClientUpdate(f"c{i}", n, {m: _module(rng) for m in mods})
        for i, (n, mods) in enumerate(plan)
    ]
    result = aggregate(g, updates, {}, 1)
    for name, weights in result.weights.items():
        trained_by = {u.client for u in updates if name in u.modules}
        assert set(weights) == trained_by
        assert sum(weights.values()) == pytest.approx(1.0)


def test_exact_merge_reproduces_the_averaged_product_when_rank_allows() -> None:
    rng = np.random.default_rng(2)
    # Two clients of rank 4 on a 5x6 matrix: the average product has rank <= 5,
    # so make the global rank 5 to hold it exactly.
    big = {
        "m": {
            "lora_A": rng.standard_normal((5, D_IN)).astype(np.float32),
            "lora_B": np.zeros((D_OUT, 5), np.float32),
        }
    }
    updates = []
    for i, n in enumerate((3, 7)):
        a = np.zeros((5, D_IN), np.float32)
        b = np.zeros((D_OUT, 5), np.float32)
        a[:2] = rng.standard_normal((2, D_IN))
        b[:, :2] = rng.standard_normal((D_OUT, 2))
        updates.append(ClientUpdate(f"c{i}", n, {"m": {"lora_A": a, "lora_B": b}}))
    result = aggregate(big, updates, {}, 1, merge="exact", dwa=DwaConfig(eta=1.0, gamma=0.0))
    expected = (3 * product(updates[0].modules["m"]) + 7 * product(updates[1].modules["m"])) / 10
    np.testing.assert_allclose(product(result.modules["m"]), expected, atol=1e-5)
    # The factors merge cannot: avg(B) avg(A) != avg(BA).
    approx = aggregate(big, updates, {}, 1, merge="factors", dwa=DwaConfig(eta=1.0, gamma=0.0))
    assert not np.allclose(product(approx.modules["m"]), expected, atol=1e-3)


def test_exact_merge_keeps_a_trainable_nonzero_A() -> None:
    rng = np.random.default_rng(3)
    g = {"m": {"lora_A": _module(rng)["lora_A"], "lora_B": np.zeros((D_OUT, RANK), np.float32)}}
    same = ClientUpdate("c", 5, {"m": {k: v.copy() for k, v in g["m"].items()}})
    result = aggregate(g, [same], {}, 1, merge="exact")
    assert np.linalg.norm(result.modules["m"]["lora_A"]) > 0.5


def test_dwa_moves_under_updated_modules_further() -> None:
    rng = np.random.default_rng(4)
    g = _global(rng, ("often", "rare"))
    stats = {"often": ModuleStats(update_count=20), "rare": ModuleStats(update_count=0)}
    update = ClientUpdate("c", 1, {"often": _module(rng), "rare": _module(rng)})
    result = aggregate(g, [update], stats, 5, dwa=DwaConfig(eta=0.5, gamma=1.0, eta_max=1.8))
    assert result.steps["often"] == pytest.approx(0.5)  # clipped below at 1 x eta
    assert result.steps["rare"] == pytest.approx(0.9)  # mean 11 / 1 -> clipped at eta_max
    # W + eta_m (Agg - W) with one client: Agg is that client's factors.
    new = result.modules["rare"]["lora_A"]
    expected = g["rare"]["lora_A"] + 0.9 * (update.modules["rare"]["lora_A"] - g["rare"]["lora_A"])
    np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6)


def test_fedavg_counts_stale_values_for_clients_that_did_not_train_a_module() -> None:
    rng = np.random.default_rng(5)
    g = _global(rng, ("m",))
    trained = _module(rng)
    updates = [ClientUpdate("a", 1, {"m": trained}), ClientUpdate("b", 3, {})]
    result = aggregate(g, updates, {}, 1, rule="fedavg")
    expected = 0.25 * trained["lora_A"] + 0.75 * g["m"]["lora_A"]
    np.testing.assert_allclose(result.modules["m"]["lora_A"], expected, rtol=1e-6)
    assert result.weights["m"] == {"a": 0.25, "<stale>": 0.75}


def test_global_score_is_updated_from_the_product_change() -> None:
    rng = np.random.default_rng(6)
    g = _global(rng, ("m",))
    result = aggregate(g, [ClientUpdate("a", 1, {"m": _module(rng)})], {}, 1)
    assert result.stats["m"].score == pytest.approx(result.changes["m"])
    assert result.changes["m"] > 0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: {"unknown": m["m1"]}, "not a module"),
        (lambda m: {"m1": {"lora_A": m["m1"]["lora_A"]}}, "do not match"),
        (lambda m: {"m1": {**m["m1"], "lora_A": m["m1"]["lora_A"][:2]}}, "shape"),
        (lambda m: {"m1": {**m["m1"], "lora_A": m["m1"]["lora_A"].astype(np.int32)}}, "dtype"),
        (
            lambda m: {"m1": {**m["m1"], "lora_B": np.full((D_OUT, RANK), np.nan, np.float32)}},
            "NaN",
        ),
        (
            lambda m: {"m1": {**m["m1"], "lora_B": np.full((D_OUT, RANK), np.inf, np.float32)}},
            "Inf",
        ),
    ],
)
def test_bad_updates_are_rejected_by_name_and_change_nothing(mutate, message) -> None:
    rng = np.random.default_rng(7)
    g = _global(rng)
    agg = Aggregator(g, {}, 1)
    good = ClientUpdate("good", 4, {"m1": _module(rng)})
    agg.add(good)
    with pytest.raises(UpdateError, match=message):
        agg.add(ClientUpdate("bad", 4, mutate({"m1": _module(rng)})))
    result = agg.result()
    np.testing.assert_allclose(
        result.modules["m1"]["lora_A"], good.modules["m1"]["lora_A"], rtol=1e-6
    )
    assert result.weights["m1"] == {"good": 1.0}


def test_the_same_client_cannot_count_twice() -> None:
    rng = np.random.default_rng(8)
    agg = Aggregator(_global(rng), {}, 1)
    agg.add(ClientUpdate("a", 1, {"m1": _module(rng)}))
    with pytest.raises(UpdateError, match="already"):
        agg.add(ClientUpdate("a", 1, {"m1": _module(rng)}))


def test_memory_does_not_grow_with_the_number_of_clients() -> None:
    import tracemalloc

    rng = np.random.default_rng(9)
    g = {
        "m": {"lora_A": np.zeros((8, 4096), np.float32), "lora_B": np.zeros((4096, 8), np.float32)}
    }
    pool = [
        {
            "m": {
                "lora_A": rng.standard_normal((8, 4096)).astype(np.float32),
                "lora_B": rng.standard_normal((4096, 8)).astype(np.float32),
            }
        }
        for _ in range(2)
    ]

    def peak(n: int) -> int:
        tracemalloc.start()
        agg = Aggregator(g, {}, 1)
        for i in range(n):
            agg.add(ClientUpdate(f"c{i}", 1, pool[i % 2]))
        agg.result()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    update_bytes = 2 * 8 * 4096 * 4
    assert peak(64) < 8 * update_bytes  # 64 clients would be 64 copies if buffered
    assert peak(64) < 2 * peak(4)


def test_refactorise_of_a_large_low_rank_matrix_is_exact() -> None:
    from fedpilot.core.aggregation import refactorise

    rng = np.random.default_rng(10)
    w = (rng.standard_normal((300, 6)) @ rng.standard_normal((6, 200))).astype(np.float32)
    a, b = refactorise(w, 8)
    np.testing.assert_allclose(b @ a, w, atol=1e-3 * np.abs(w).max())
    np.testing.assert_allclose(a[:6] @ a[:6].T, np.eye(6), atol=1e-4)


def _assert_same_modules(got, expected, **tolerance) -> None:
    """Every tensor of ``expected`` equal in ``got`` (to ``tolerance`` when given)."""
    for name, parts in expected.items():
        for part, x in parts.items():
            if tolerance:
                np.testing.assert_allclose(got[name][part], x, **tolerance)
            else:
                np.testing.assert_array_equal(got[name][part], x)


def _received(modules):
    """The same modules as views into one decoded payload (adjacent in memory)."""
    from fedpilot.core.aggregation import flatten, unflatten
    from fedpilot.wire.payload import decode_tensors, encode_tensors

    data, _ = encode_tensors(flatten(modules))
    return unflatten(decode_tensors(data))


def test_updates_backed_by_one_payload_aggregate_like_separate_arrays() -> None:
    rng = np.random.default_rng(11)
    g = _global(rng, ("m1", "m2", "m3", "m4"))
    plain = [
        ClientUpdate("a", 3, {n: _module(rng) for n in ("m1", "m2", "m4")}),
        ClientUpdate("b", 5, {n: _module(rng) for n in ("m2", "m3")}),
    ]
    packed = [ClientUpdate(u.client, u.num_samples, _received(u.modules)) for u in plain]
    agg = Aggregator(g, {}, 1)
    keys = sorted(((m, p) for m in packed[0].modules for p in g[m]), key=lambda k: f"{k[0]}/{k[1]}")
    assert len(agg._runs(packed[0], keys)) == 2
    expected, result = aggregate(g, plain, {}, 1), aggregate(g, packed, {}, 1)
    _assert_same_modules(result.modules, expected.modules)


def test_nan_inside_a_payload_backed_update_is_named_and_changes_nothing() -> None:
    rng = np.random.default_rng(12)
    g = _global(rng)
    good = ClientUpdate("good", 2, _received({"m1": _module(rng), "m2": _module(rng)}))
    bad_modules = {"m1": _module(rng), "m2": _module(rng)}
    bad_modules["m2"]["lora_B"][1, 1] = np.nan
    agg = Aggregator(g, {}, 1)
    agg.add(good)
    with pytest.raises(UpdateError, match="'m2', lora_B: contains NaN"):
        agg.add(ClientUpdate("bad", 2, _received(bad_modules)))
    result = agg.result()
    np.testing.assert_allclose(
        result.modules["m2"]["lora_B"], good.modules["m2"]["lora_B"], rtol=1e-6, atol=1e-6
    )


def test_initial_adapter_is_deterministic_and_starts_at_the_base_model() -> None:
    from fedpilot.core.initial import initial_adapter

    shapes = {"m": {"lora_A": [4, 6], "lora_B": [5, 4]}, "head": {"weight": [3, 6], "bias": [3]}}
    a, b = initial_adapter(shapes, seed=1), initial_adapter(shapes, seed=1)
    assert all(np.array_equal(a[m][p], b[m][p]) for m in a for p in a[m])
    assert not np.any(product(a["m"]))  # B = 0: the adapted model equals the base model
    assert np.abs(a["m"]["lora_A"]).max() <= 1 / np.sqrt(6)
    assert a["head"]["weight"].std() > 0 and not np.any(a["head"]["bias"])


def _packed(modules, dtype="float32"):
    """The update as the coordinator builds it from a stored payload."""
    from fedpilot.core.aggregation import Packed, flatten
    from fedpilot.wire.payload import decode_packed, encode_tensors

    tensors = {k: x.astype(dtype) for k, x in flatten(modules).items()}
    return Packed(*decode_packed(encode_tensors(tensors)[0]))


@pytest.mark.parametrize("merge", ["factors", "exact"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_updates_aggregate_like_module_dicts(merge, dtype) -> None:
    rng = np.random.default_rng(13)
    g = _global(rng, ("m1", "m2", "m3", "m4"))
    plain = [
        ClientUpdate("a", 3, {n: _module(rng) for n in ("m1", "m2", "m4")}),
        ClientUpdate("b", 5, {n: _module(rng) for n in ("m2", "m3")}),
        ClientUpdate("c", 2, {n: _module(rng) for n in ("m1", "m4")}),
    ]
    if dtype == "float16":  # what the receiver would have widened
        plain = [
            ClientUpdate(
                u.client,
                u.num_samples,
                {
                    m: {p: x.astype(np.float16) for p, x in parts.items()}
                    for m, parts in u.modules.items()
                },
            )
            for u in plain
        ]
    packed = [
        ClientUpdate(u.client, u.num_samples, packed=_packed(u.modules, dtype), finite=True)
        for u in plain
    ]
    expected = aggregate(g, plain, {}, 2, merge=merge)
    result = aggregate(g, packed, {}, 2, merge=merge)
    assert result.weights == expected.weights and result.stats == expected.stats
    _assert_same_modules(result.modules, expected.modules, rtol=1e-6, atol=1e-7)


def test_a_packed_layout_is_checked_once_and_reused() -> None:
    rng = np.random.default_rng(14)
    g = _global(rng)
    agg = Aggregator(g, {}, 1)
    for i in range(5):
        agg.add(ClientUpdate(f"c{i}", 1, packed=_packed({"m1": _module(rng), "m3": _module(rng)})))
    assert len(agg._plans) == 1
    # m1 and m3 are not adjacent in the accumulator, so two stretches; each one large.
    (plan,) = agg._plans.values()
    assert len(plan.runs) == 2 and plan.modules == ("m1", "m3")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: replace(p, keys=("unknown/lora_A", *p.keys[1:])), "not a module"),
        (
            lambda p: replace(
                p, keys=p.keys[:1], shapes=p.shapes[:1], values=p.values[: RANK * D_IN]
            ),
            "do not match",
        ),
        (lambda p: replace(p, shapes=((2, D_IN), *p.shapes[1:])), "shape"),
        (lambda p: replace(p, keys=("m1lora_A", *p.keys[1:])), "not 'module/tensor'"),
        (lambda p: replace(p, keys=("m1/lora_A", "m1/lora_A")), "repeated"),
        (lambda p: replace(p, values=p.values[:-1]), "layout needs"),
        (lambda p: replace(p, values=p.values.astype(np.int32)), "dtype"),
        (
            lambda p: replace(p, values=np.where(np.arange(p.values.size) == 30, np.inf, p.values)),
            "'m1', lora_B: contains NaN or Inf",
        ),
    ],
)
def test_bad_packed_updates_are_rejected_by_name_and_change_nothing(mutate, message) -> None:
    rng = np.random.default_rng(15)
    g = _global(rng)
    agg = Aggregator(g, {}, 1)
    good = {"m1": _module(rng)}
    agg.add(ClientUpdate("good", 4, packed=_packed(good)))
    with pytest.raises(UpdateError, match=message):
        agg.add(ClientUpdate("bad", 4, packed=mutate(_packed({"m1": _module(rng)}))))
    result = agg.result()
    np.testing.assert_allclose(
        result.modules["m1"]["lora_A"], good["m1"]["lora_A"], rtol=1e-6, atol=1e-6
    )
    assert result.weights["m1"] == {"good": 1.0}


def test_folding_over_threads_gives_the_same_bits() -> None:
    rng = np.random.default_rng(16)
    shape_a, shape_b = (8, 40_000), (40_000, 8)  # 640k numbers: several fold blocks
    g = {
        f"m{i}": {
            "lora_A": rng.standard_normal(shape_a).astype(np.float32),
            "lora_B": rng.standard_normal(shape_b).astype(np.float32),
        }
        for i in range(2)
    }
    updates = [
        ClientUpdate(f"c{k}", k + 1, packed=_packed({n: g[n] for n in ("m0", "m1")[: k % 2 + 1]}))
        for k in range(4)
    ]

    def run(threads: int) -> dict:
        agg = Aggregator(g, {}, 1, fold_threads=threads)
        for u in updates:
            agg.add(u)
        return agg.result().modules

    _assert_same_modules(run(3), run(1))


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_product_changes_match_the_dense_products(scale) -> None:
    from fedpilot.core.aggregation import product_changes

    rng = np.random.default_rng(17)
    pairs = []
    for shape_a, shape_b in [((4, 30), (20, 4)), ((4, 30), (20, 4)), ((2, 7), (9, 2))]:
        before = {
            "lora_A": rng.standard_normal(shape_a).astype(np.float32),
            "lora_B": rng.standard_normal(shape_b).astype(np.float32),
        }
        after = {
            k: (x + scale * rng.standard_normal(x.shape)).astype(np.float32)
            for k, x in before.items()
        }
        pairs.append((before, after))
    for (before, after), (delta, norm) in zip(pairs, product_changes(pairs), strict=True):
        dense_before = before["lora_B"].astype(np.float64) @ before["lora_A"].astype(np.float64)
        dense_after = after["lora_B"].astype(np.float64) @ after["lora_A"].astype(np.float64)
        # A small change is not lost to cancellation against the large norms.
        assert delta == pytest.approx(np.sum((dense_after - dense_before) ** 2), rel=1e-3)
        assert norm == pytest.approx(np.sum(dense_after**2), rel=1e-5)


@pytest.mark.parametrize("clients", [3, 40])  # 40 x rank 4 on 40 x 30: the sum turns dense
@pytest.mark.parametrize("rule", ["stagg", "fedavg"])
def test_exact_merge_is_the_truncated_svd_of_the_dense_step(clients, rule) -> None:
    from fedpilot.core.aggregation import ProductSum
    from fedpilot.core.ig_score import relative_change

    rng = np.random.default_rng(18)
    out, inn = 40, 30

    def module() -> dict[str, np.ndarray]:
        return {
            "lora_A": rng.standard_normal((RANK, inn)).astype(np.float32),
            "lora_B": rng.standard_normal((out, RANK)).astype(np.float32),
        }

    g = {"m1": module(), "m2": module()}
    updates = [
        ClientUpdate(f"c{i}", int(rng.integers(1, 9)), {"m1": module(), "m2": module()})
        if i % 3
        else ClientUpdate(f"c{i}", 5, {"m2": module()})  # FedAvg counts these as stale
        for i in range(clients)
    ]
    stats = {"m1": ModuleStats(update_count=1), "m2": ModuleStats(update_count=9)}
    result = aggregate(g, updates, stats, 2, rule=rule, merge="exact")
    trained = [u for u in updates if "m1" in u.modules]
    total = sum(u.num_samples for u in updates)
    denom = total if rule == "fedavg" else sum(u.num_samples for u in trained)
    stale = (total - sum(u.num_samples for u in trained)) / total if rule == "fedavg" else 0.0
    w = product(g["m1"]).astype(np.float64)
    sums = sum(u.num_samples * product(u.modules["m1"]).astype(np.float64) for u in trained)
    step = result.steps["m1"]
    new_w = w + step * (sums / denom + stale * w - w)
    if clients == 40:
        # Stacks larger than the matrix: the dense sum and refactorise, as before.
        from fedpilot.core.aggregation import refactorise

        a, b = refactorise(new_w.astype(np.float32), RANK)
        truncated = (b @ a).astype(np.float64)
    else:
        u, s, vt = np.linalg.svd(new_w)
        truncated = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
    got = product(result.modules["m1"]).astype(np.float64)
    assert np.linalg.norm(got - truncated) <= 1e-5 * np.linalg.norm(truncated)
    expected_change = relative_change(np.sum((new_w - w) ** 2), np.sum(new_w**2))
    assert result.changes["m1"] == pytest.approx(expected_change, rel=1e-4)
    a = result.modules["m1"]["lora_A"]
    np.testing.assert_allclose(a @ a.T, np.eye(RANK), atol=1e-5)
    held = ProductSum(g["m1"])
    for u in trained:
        held.add(u.modules["m1"], u.num_samples)
    assert held.dense is (clients == 40)


def test_an_accumulator_reused_from_an_earlier_round_starts_from_zero() -> None:
    # Prepare: a round that leaves huge sums in its accumulator, then goes away
    from fedpilot.core.aggregation import ClientUpdate, aggregate

    g = {"m": {"w": np.zeros((64, 64), np.float32)}}
    big = {"m": {"w": np.full((64, 64), 1e6, np.float32)}}
    aggregate(g, [ClientUpdate("x", 7, big)], {}, 1, rule="fedavg")

    # Execute: the next round of the same size gets that buffer back
    ones = {"m": {"w": np.ones((64, 64), np.float32)}}
    result = aggregate(g, [ClientUpdate("a", 3, ones)], {}, 2, rule="fedavg")

    # Assert: only this round's update counts
    np.testing.assert_array_equal(result.modules["m"]["w"], 1.0)
