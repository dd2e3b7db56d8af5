"""Where adapter bytes should live: a blob directory or PostgreSQL ``bytea``.

Writes and reads payloads of several sizes both ways on this machine and
prints one JSON line per (backend, size): the measurement behind the choice of
a content-addressed directory (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, insert, select
from sqlalchemy.engine import Engine

from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.db.store import make_engine
from fedpilot.wire.payload import MAX_CHUNK_BYTES as CHUNK_BYTES

MIB = 1 << 20
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _url() -> str:
    for env in ("FEDPILOT_BENCH_POSTGRES_URL", "FEDPILOT_DATABASE_URL"):
        url = os.environ.get(env, "").strip()
        if url.startswith("postgresql"):
            return url
    return DEFAULT_PG


def _chunks(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES]


def _peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / MIB
    finally:
        tracemalloc.stop()


class _BlobDir:
    name = "blob_dir"

    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root)

    def write(self, data: bytes) -> str:
        return self.store.put(_chunks(data))[0]

    def read(self, key: str) -> int:
        return sum(len(c) for c in self.store.iter_chunks(key, CHUNK_BYTES))

    def drop(self, key: str) -> None:
        self.store.path(key).unlink()


class _Bytea:
    name = "pg_bytea"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.table = Table(
            f"fedpilot_bench_blobs_{uuid.uuid4().hex[:8]}",
            MetaData(),
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("sha256", String(64), nullable=False),
            Column("data", LargeBinary, nullable=False),
        )
        self.table.create(engine)

    def write(self, data: bytes) -> int:
        sha = hashlib.sha256(data).hexdigest()
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    insert(self.table).values(sha256=sha, data=data).returning(self.table.c.id)
                ).scalar_one()
            )

    def read(self, key: int) -> int:
        with self.engine.connect() as conn:
            data = conn.execute(select(self.table.c.data).where(self.table.c.id == key)).scalar()
        return len(data or b"")

    def drop(self, key: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.id == key))

    def close(self) -> None:
        self.table.drop(self.engine)


def _measure(backend: Any, size_mib: int, repeats: int) -> dict[str, Any]:
    data = os.urandom(size_mib * MIB)  # tensors barely compress; neither does this
    writes: list[float] = []
    reads: list[float] = []
    keys: list[Any] = []
    for _ in range(repeats):
        data = data[1:] + data[:1]  # fresh content: no write may be skipped as a duplicate
        start = time.perf_counter()
        keys.append(backend.write(data))
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        backend.read(keys[-1])
        reads.append(time.perf_counter() - start)
    peak = _peak_mib(lambda: backend.read(keys[-1]))
    for k in keys:
        backend.drop(k)
    write_s, read_s = statistics.median(writes), statistics.median(reads)
    return {
        "bench": "blob_store",
        "backend": backend.name,
        "size_mib": size_mib,
        "repeats": repeats,
        "write_s": round(write_s, 5),
        "read_s": round(read_s, 5),
        "write_mib_s": round(size_mib / write_s, 1),
        "read_mib_s": round(size_mib / read_s, 1),
        "read_peak_alloc_mib": round(peak, 2),
    }


def run(
    sizes_mib: Sequence[int] = (1, 8, 32),
    repeats: int = 5,
    *,
    postgres_url: str | None = None,
    root: str | Path | None = None,
) -> Iterator[dict[str, Any]]:
    """One result dict per (backend, size); ``root`` is where the blob directory goes
    (default: a temporary directory under the current one, i.e. on the data disk)."""
    engine = make_engine(postgres_url or _url())
    bytea = _Bytea(engine)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-blobs-", dir=root or ".") as tmp:
            blob_dir = _BlobDir(Path(tmp))
            for size in sizes_mib:
                for backend in (blob_dir, bytea):
                    yield _measure(backend, size, repeats)
    finally:
        bytea.close()
        engine.dispose()
