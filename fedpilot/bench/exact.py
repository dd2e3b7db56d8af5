"""The ``exact`` merge from stacked factors against the dense product it replaces.

Both sides are :class:`fedpilot.core.aggregation.ProductSum`: stacked (QR of
the factor stacks, SVD of the small core) and ``stacked=False`` (every client's
``out x in`` product added, then a randomized truncated SVD). Each is compared
with the exact rank-``r`` truncation of the same matrix, computed in float64
with ARPACK (``scipy.sparse.linalg.svds``), so the error column says which one
is right, not only whether they agree.

Client updates share a common low-rank direction plus client-specific noise,
as fine-tuning updates of one task do; with no shared direction at all (pure
noise) a rank-``r`` truncation is not meaningful and the randomized SVD is far
from exact.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np

from fedpilot.core.aggregation import LORA_A, LORA_B, ProductSum

SHAPES = {
    # name: (modules as (out, in) pairs, rank, clients)
    "bert-base": ([(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12, 8, 10),
    "7b-layer": ([(4096, 4096)], 16, 100),
}


def _client(rng: np.random.Generator, shared: tuple[np.ndarray, np.ndarray], noise: float):
    b, a = shared
    mix = rng.standard_normal((b.shape[1], b.shape[1])).astype(np.float32)
    return {
        LORA_B: (b @ mix + noise * rng.standard_normal(b.shape)).astype(np.float32),
        LORA_A: (a + noise * rng.standard_normal(a.shape)).astype(np.float32),
    }


def _samples(clients: int) -> list[int]:
    """Each client's sample count: unequal, so the mean is weighted."""
    return [10 + i for i in range(clients)]


def _merge(
    current: dict[str, np.ndarray], clients: list[dict[str, np.ndarray]], stacked: bool
) -> tuple[np.ndarray, np.ndarray]:
    held = ProductSum(current, stacked=stacked)
    counts = _samples(len(clients))
    for c, n in zip(clients, counts, strict=True):
        held.add(c, n)
    a, b, _, _ = held.merge(0.0, 1.0 / sum(counts))
    return a, b


def _exact_truncation(clients: list[dict[str, np.ndarray]], rank: int) -> np.ndarray:
    """``T_r(W')``: the weighted mean of the products truncated to ``rank`` in float64."""
    from scipy.sparse.linalg import svds

    counts = _samples(len(clients))
    w = sum(
        n * c[LORA_B].astype(np.float64) @ c[LORA_A].astype(np.float64)
        for c, n in zip(clients, counts, strict=True)
    ) / sum(counts)
    u, s, vt = svds(w, k=rank, tol=1e-12, random_state=0)
    return np.asarray((u * s) @ vt)


def _error(truth: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """``||B A - T_r(W')||_F / ||T_r(W')||_F``."""
    got = b.astype(np.float64) @ a.astype(np.float64)
    return float(np.linalg.norm(got - truth) / np.linalg.norm(truth))


def run(
    shapes: tuple[str, ...] = ("bert-base", "7b-layer"), noise: float = 0.1
) -> Iterator[dict[str, Any]]:
    for name in shapes:
        modules, rank, n_clients = SHAPES[name]
        rng = np.random.default_rng(0)
        row: dict[str, Any] = {
            "bench": "exact_merge",
            "shape": name,
            "modules": len(modules),
            "rank": rank,
            "clients": n_clients,
        }
        errors: dict[str, float] = {"stacked": 0.0, "dense": 0.0}
        seconds = {"stacked": 0.0, "dense": 0.0}
        peaks = {"stacked": 0, "dense": 0}
        for out, inn in modules:
            shared = (
                (rng.standard_normal((out, rank)) / np.sqrt(rank)).astype(np.float32),
                (rng.standard_normal((rank, inn)) / np.sqrt(inn)).astype(np.float32),
            )
            current = {LORA_A: shared[1].copy(), LORA_B: np.zeros((out, rank), np.float32)}
            clients = [_client(rng, shared, noise) for _ in range(n_clients)]
            truth = _exact_truncation(clients, rank)
            for way in ("stacked", "dense"):
                start = time.perf_counter()
                a, b = _merge(current, clients, way == "stacked")
                seconds[way] += time.perf_counter() - start
                tracemalloc.start()  # apart from the timing: tracing slows allocation
                _merge(current, clients, way == "stacked")
                peaks[way] = max(peaks[way], tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                errors[way] = max(errors[way], _error(truth, a, b))
        for way in ("stacked", "dense"):
            row[f"{way}_s"] = round(seconds[way], 4)
            row[f"{way}_peak_bytes"] = peaks[way]
            row[f"{way}_error_to_exact"] = float(f"{errors[way]:.3g}")
        row["speedup"] = round(seconds["dense"] / seconds["stacked"], 2)
        yield row
