"""What one statement a worker causes costs the coordinator, by the way it is run.

The poll's read (``Store.offered_task``: a worker's oldest offered task with its
round's deadline) run ``reads`` times four ways on the same PostgreSQL: through
SQLAlchemy on a blocking connection (the coordinator's path), through SQLAlchemy's
asyncio layer, and through psycopg alone, blocking and asyncio, with the SQL that
SQLAlchemy compiles from the same statement. CPU and wall time per read; each path
must return the same task. The measurement behind "An async driver, measured and
not kept" in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from fedpilot.bench.load import fresh_schema
from fedpilot.coordinator.db.models import Task, utcnow
from fedpilot.coordinator.db.store import _OFFERED_TASK, Store


def _row(name: str, reads: int, cpu: float, wall: float) -> dict[str, Any]:
    return {
        "path": name,
        "cpu_us_per_read": round(cpu / reads * 1e6, 1),
        "wall_us_per_read": round(wall / reads * 1e6, 1),
    }


def _timed(name: str, reads: int, read: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """``read`` once to warm up (connections opened, statements prepared), then
    ``reads`` times; the row and what the last read returned."""
    read()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reads - 1):
        read()
    last = read()
    return _row(name, reads, time.process_time() - cpu, time.perf_counter() - wall), last


async def _timed_async(
    name: str, reads: int, read: Callable[[], Awaitable[Any]]
) -> tuple[dict[str, Any], Any]:
    """:func:`_timed` for a coroutine."""
    await read()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reads - 1):
        await read()
    last = await read()
    return _row(name, reads, time.process_time() - cpu, time.perf_counter() - wall), last


def _seed(store: Store) -> str:
    """A worker holding one offered task; its id."""
    job_id = store.create_job("bench-statements", {"rounds": 1})
    worker_id, _ = store.register_worker("w", {}, {}, 1)
    task = Task(
        id=str(uuid.uuid4()),
        job_id=job_id,
        round=1,
        worker_id=worker_id,
        kind="train",
        modules=["m"],
        scores={},
        status="offered",
    )
    store.open_round(
        job_id,
        1,
        state="training",
        participants=[worker_id],
        deadline_at=utcnow() + timedelta(minutes=5),
        tasks=[task],
    )
    return worker_id


def measure(reads: int, url: str) -> list[dict[str, Any]]:
    import psycopg
    from sqlalchemy import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    rows: list[dict[str, Any]] = []
    with fresh_schema(url) as schema_url:
        store = Store.open(schema_url)
        worker_id = _seed(store)
        compiled = _OFFERED_TASK.compile(dialect=store.engine.dialect)
        sql, params = str(compiled), {**compiled.params, "worker_id": worker_id}
        conninfo = make_url(schema_url).set(drivername="postgresql")
        dsn = conninfo.render_as_string(hide_password=False)
        found: dict[str, str | None] = {}

        def keep(result: tuple[dict[str, Any], Any]) -> None:
            row, last = result
            rows.append(row)
            found[row["path"]] = last[0] if last is not None else None  # the task's id

        keep(_timed("sqlalchemy", reads, lambda: store.offered_task(worker_id)))
        with psycopg.connect(dsn, autocommit=True) as conn:
            keep(_timed("psycopg", reads, lambda: conn.execute(sql, params).fetchone()))

        async def on_loop() -> None:
            engine = create_async_engine(
                make_url(schema_url).set(drivername="postgresql+psycopg_async")
            ).execution_options(isolation_level="AUTOCOMMIT")
            aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

            async def via_sqlalchemy() -> Any:
                async with engine.connect() as c:
                    return (await c.execute(_OFFERED_TASK, {"worker_id": worker_id})).first()

            async def via_psycopg() -> Any:
                return await (await aconn.execute(sql, params)).fetchone()

            keep(await _timed_async("sqlalchemy_asyncio", reads, via_sqlalchemy))
            keep(await _timed_async("psycopg_asyncio", reads, via_psycopg))
            await aconn.close()
            await engine.dispose()

        asyncio.run(on_loop())
        store.engine.dispose()
    baseline = next(r["cpu_us_per_read"] for r in rows if r["path"] == "psycopg")
    same = len(set(found.values())) == 1 and None not in found.values()
    for r in rows:
        r.update(
            bench="statements",
            reads=reads,
            cpu_ratio_to_psycopg=round(r["cpu_us_per_read"] / baseline, 2),
            same_task_as_every_path=same,
        )
    return rows
