import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpilot.core.partition import dirichlet_partition, iid_partition


@given(
    st.lists(st.integers(0, 9), min_size=100, max_size=300),
    st.integers(1, 10),
    st.sampled_from([0.1, 0.5, 1.0, 100.0]),
    st.integers(0, 2**31),
)
def test_dirichlet_is_deterministic_and_covers_every_sample_once(
    labels, clients, alpha, seed
) -> None:
    a = dirichlet_partition(labels, clients, alpha, seed, min_size=1)
    b = dirichlet_partition(labels, clients, alpha, seed, min_size=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    merged = np.sort(np.concatenate(a))
    assert np.array_equal(merged, np.arange(len(labels)))
    assert min(len(p) for p in a) >= 1


@given(st.integers(0, 500), st.integers(1, 20), st.integers(0, 1000))
def test_iid_covers_every_sample_once_in_near_equal_parts(n, clients, seed) -> None:
    parts = iid_partition(n, clients, seed)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(
        np.array_equal(x, y) for x, y in zip(parts, iid_partition(n, clients, seed), strict=True)
    )


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        return float(np.mean([len(np.unique(labels[p])) for p in parts]))

    assert mean_classes(0.1) < mean_classes(100.0)


def test_different_seeds_give_different_splits() -> None:
    labels = np.repeat(np.arange(5), 40)
    a = dirichlet_partition(labels, 4, 0.5, seed=1)
    b = dirichlet_partition(labels, 4, 0.5, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_impossible_requests_are_explained() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition([0, 1], 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="samples each"):
        dirichlet_partition([0, 1], 3, 1.0, seed=0)


def test_pathological_split_gives_each_client_k_classes_and_loses_nothing_drawn() -> None:
    import numpy as np

    from fedpilot.core.partition import pathological_partition

    labels = np.repeat(np.arange(10), 20)
    parts = pathological_partition(labels, 10, 2, seed=4)
    assert all(len(set(labels[p])) == 2 for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == len(labels)  # every class drawn exactly twice
    assert [p.tolist() for p in parts] == [
        p.tolist() for p in pathological_partition(labels, 10, 2, seed=4)
    ]
