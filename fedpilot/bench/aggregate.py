"""STAgg throughput against memory-copy bandwidth, and its peak memory.

Updates arrive as the coordinator holds them: a stored payload, checked finite
by the receiver, decoded as one flat array. ``ratio_to_memcpy`` covers the
whole round (every update folded in, then the new global adapter and its
change scores); ``fold_ratio_to_memcpy`` only the per-update part, which is
what grows with the number of clients. The finishing step costs the same at
any client count, so it weighs most at 10 clients.
"""

from __future__ import annotations

import resource
import time
import tracemalloc
from collections.abc import Iterator
from itertools import cycle, islice
from typing import Any

import numpy as np

from fedpilot.bench.synthetic import encoder_memory, lora_update
from fedpilot.core.aggregation import FOLD_THREADS, Aggregator, ClientUpdate, Packed, flatten
from fedpilot.wire.payload import decode_packed, encode_tensors

POOL = 4  # distinct updates generated up front and replayed, so generation is not timed


def _updates(pool: list[Packed], n: int) -> Iterator[ClientUpdate]:
    for i, packed in enumerate(islice(cycle(pool), n)):
        yield ClientUpdate(client=f"c{i}", num_samples=100 + i, packed=packed, finite=True)


def _as_received(modules: dict[str, dict[str, np.ndarray]]) -> Packed:
    """An update as the coordinator aggregates it: a stored payload, checked finite
    by the receiver, decoded as one flat array."""
    data, _ = encode_tensors(flatten(modules))
    return Packed(*decode_packed(data))


def _memcpy_gbps(nbytes: int, repeats: int) -> float:
    """Copy ``repeats`` update-sized buffers, cycling through ``POOL`` sources like the
    aggregation does, into one update-sized destination: the same bytes read from
    the same working set, with the least work any merge could do."""
    sources = [np.ones(nbytes // 4, dtype=np.float32) for _ in range(POOL)]
    dst = np.empty_like(sources[0])
    np.copyto(dst, sources[0])
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for src in islice(cycle(sources), repeats):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes * repeats / best / 1e9


def run(
    clients: tuple[int, ...] = (10, 100),
    merges: tuple[str, ...] = ("factors", "exact"),
    rank: int = 8,
) -> Iterator[dict[str, Any]]:
    memory = encoder_memory()
    # Updates as the coordinator holds them: decoded from a received payload.
    pool = [_as_received(lora_update(memory, rank, seed)) for seed in range(POOL)]
    global_modules = lora_update(memory, rank, seed=99)
    update_bytes = pool[0].values.nbytes
    for merge in merges:
        for n in clients:

            def aggregate_all(merge: str = merge, n: int = n) -> tuple[float, float]:
                start = time.perf_counter()
                agg = Aggregator(global_modules, {}, 1, merge=merge)
                for u in _updates(pool, n):
                    agg.add(u)
                folded = time.perf_counter()
                agg.result()
                return folded - start, time.perf_counter() - folded

            best, best_fold, best_finish = float("inf"), float("inf"), float("inf")
            aggregate_all()  # warm: page faults of first allocations, thread start
            for _ in range(5):
                fold, finish = aggregate_all()
                best, best_fold = min(best, fold + finish), min(best_fold, fold)
                best_finish = min(best_finish, finish)
            tracemalloc.start()
            aggregate_all()
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            memcpy = _memcpy_gbps(update_bytes, n)
            gbps, fold_gbps = update_bytes * n / best / 1e9, update_bytes * n / best_fold / 1e9
            yield {
                "bench": "aggregate",
                "merge": merge,
                "clients": n,
                "update_bytes": update_bytes,
                "fold_threads": FOLD_THREADS,
                "seconds": round(best, 4),
                "fold_seconds": round(best_fold, 4),
                "finish_seconds": round(best_finish, 4),
                "gb_per_s": round(gbps, 3),
                "memcpy_gb_per_s": round(memcpy, 3),
                "ratio_to_memcpy": round(gbps / memcpy, 3),
                "fold_ratio_to_memcpy": round(fold_gbps / memcpy, 3),
                "aggregator_peak_bytes": traced_peak,
                "all_updates_bytes": update_bytes * n,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
