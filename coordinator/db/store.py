"""The coordinator's one store: every state change that matters is one transaction.

The round driver and the gRPC/REST handlers call these methods; none of them
holds a session across calls, so any thread may use the store. Transient
connection errors (a PostgreSQL restart, a killed backend) are retried with
backoff; a retried write is safe because each is idempotent or runs in one
transaction that either committed or did not.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

from sqlalchemy import bindparam, create_engine, event, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from fedpilot.coordinator.db import migrate
from fedpilot.coordinator.db.models import (
    AdapterVersion,
    Job,
    ModuleStat,
    Profile,
    Rejection,
    Round,
    Task,
    Update,
    Worker,
    utcnow,
)
from fedpilot.core.ig_score import ModuleStats

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
"""A job state no later write may undo (the round driver may race a cancel)."""

P = ParamSpec("P")
R = TypeVar("R")

TRANSIENT_ERRORS = (OperationalError, InterfaceError, PoolTimeout)
"""Worth retrying: a dropped connection, and a wait for a pooled connection that ran out
(every connection busy under load: a moment's condition, not a fault of the work)."""

_transient = retry(
    retry=retry_if_exception_type(TRANSIENT_ERRORS),
    wait=wait_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(60),
    reraise=True,
)


def retrying(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry ``fn`` on connection-level database errors for up to a minute."""
    return _transient(fn)


def database_url(data_dir: str | Path) -> str:
    """``FEDPILOT_DATABASE_URL`` or the embedded SQLite file under ``data_dir``."""
    url = os.environ.get("FEDPILOT_DATABASE_URL", "").strip()
    if url:
        return url
    path = Path(data_dir) / "fedpilot.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # No pre-ping: it cost a round trip per checkout (a tenth of the coordinator's CPU at
    # 500 workers); a connection the server dropped fails its first statement instead,
    # which invalidates the pool, and every store call retries (``retrying``).
    return create_engine(url, pool_size=10, max_overflow=20)


INT32 = 2**31
"""Round and version numbers are INTEGER columns; a larger number from a request is unknown."""


def plausible_id(value: str) -> bool:
    """Ids are UUIDs: anything long or holding NUL (which PostgreSQL text refuses) is unknown
    without asking the database."""
    return 0 < len(value) <= 36 and "\x00" not in value


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: NUL (which its text type refuses) written as an escape."""
    return text.replace("\x00", "\\x00")


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 suffices (no password stretching)."""
    return hashlib.sha256(token.encode()).hexdigest()


class AuthError(Exception):
    """Unknown worker or wrong token (deliberately not saying which to the caller)."""


class TaskClosed(Exception):
    """The task is no longer open (its round closed, or it was withdrawn)."""


@dataclass(frozen=True)
class UpdateRecord:
    update_id: int
    duplicate: bool


class TaskState(NamedTuple):
    """Whose a task is, what kind, and where it stands: what a call about a task checks."""

    id: str
    job_id: str
    round: int
    worker_id: str
    kind: str
    status: str


class TaskOffer(NamedTuple):
    """What a poll hands a worker: its oldest open task, with its round's deadline."""

    id: str
    job_id: str
    round: int
    kind: str
    modules: list[Any]
    adapter_version: int
    predicted_bytes: int
    deadline_at: datetime | None


class UploadTarget(NamedTuple):
    """The task an upload names, read with its round's state and the update already
    stored for it (``update_id``): what an upload is checked against before its bytes."""

    id: str
    job_id: str
    round: int
    worker_id: str
    kind: str
    status: str
    modules: list[Any]
    round_state: str | None
    round_closed_at: datetime | None
    update_id: int | None


_ROUND_OF_TASK = (Round.job_id == Task.job_id) & (Round.number == Task.round)

# The reads every worker causes each round, one statement each, built once: a task's
# state, a poll's task with its deadline, and an upload's task, round and earlier update.
# Selected as columns on a connection, not as ORM rows in a session: at 500 workers
# single-row ORM reads were about 30% of the coordinator's CPU samples.
_TASK_STATE = select(*(getattr(Task, f) for f in TaskState._fields)).where(
    Task.id == bindparam("task_id")
)
_OFFERED_TASK = (
    select(*(getattr(Task, f) for f in TaskOffer._fields[:-1]), Round.deadline_at)
    .select_from(Task)
    .outerjoin(Round, _ROUND_OF_TASK)
    .where(Task.worker_id == bindparam("worker_id"), Task.status == "offered")
    .order_by(Task.created_at)
    .limit(1)
)
_UPLOAD_TARGET = (
    select(
        *(getattr(Task, f) for f in UploadTarget._fields[:7]),
        Round.state,
        Round.closed_at,
        Update.id,
    )
    .select_from(Task)
    .outerjoin(Round, _ROUND_OF_TASK)
    .outerjoin(
        Update,
        (Update.job_id == Task.job_id)
        & (Update.round == Task.round)
        & (Update.worker_id == Task.worker_id),
    )
    .where(Task.id == bindparam("task_id"))
)

_UPSERTS = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}


def _finish_offered(task_id: str) -> Any:
    """Mark a task done if it is still offered (a straggler's stays as it is)."""
    tasks = Task.__table__.c
    return (
        update(Task.__table__)
        .where(tasks.id == task_id, tasks.status == "offered")
        .values(status="done", updated_at=utcnow())
    )


POLL_BEAT_S = 2.0
"""How stale a polling worker's beat may get before a read without a timeout
(:meth:`Store.workers`) refreshes it: as often as the configured interval."""

_ANY_VERSION = (
    select(AdapterVersion.version).where(AdapterVersion.job_id == bindparam("job_id")).limit(1)
)


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int = 100_000) -> None:
    """Keep ``value`` in a cache of rows that never change; a full cache starts over
    (bounded memory whatever ids a caller invents)."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        """Reads of columns straight on a connection (no session, no transaction)."""
        self._reads = sessionmaker(self._autocommit, expire_on_commit=False)
        self._known: dict[str, Worker] = {}
        """Authenticated workers by id: a worker's token hash never changes, so every call
        after the first skips the database (at 500 workers that was most of its load)."""
        self._by_token: dict[str, Worker] = {}
        """Authenticated workers by token hash (the same reasoning as ``_known``)."""
        self._versions: dict[tuple[str, int], AdapterVersion] = {}
        """Committed adapter versions (never changed once written, and jobs are never
        deleted): every download and upload looked its version up by key."""
        self._beats: dict[str, tuple[datetime, str, str | None]] = {}
        """Heartbeats not yet written; flushed in one statement before liveness is read."""
        self._beats_lock = threading.Lock()
        self._with_version: set[str] = set()
        """Jobs known to have a global adapter version (:meth:`has_version`)."""
        self._polls: dict[str, tuple[int, float]] = {}
        """Workers with a long poll open: how many, and when their last beat was recorded
        (monotonic). An open poll is the worker's heartbeat (:meth:`poll_opened`)."""

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Store:
        engine = make_engine(url)
        if upgrade:
            retrying(migrate.upgrade)(engine)
        return cls(engine)

    def session(self) -> Session:
        """A session for writes: ``with self.session() as s, s.begin():``."""
        return self._sessions()

    def reading(self) -> Session:
        """A session for reads, without a transaction: no BEGIN before and no ROLLBACK
        after each read (two round trips of three). Each statement sees committed data,
        as under PostgreSQL's default READ COMMITTED; nothing written here is kept."""
        return self._reads()

    # -- workers ---------------------------------------------------------------------------

    @retrying
    def register_worker(
        self, name: str, labels: Mapping[str, str], device: Mapping[str, Any], budget_bytes: int
    ) -> tuple[str, str]:
        """A new worker id and its secret token; only the token's hash is kept. The worker
        is remembered for its calls to come, which then ask the database nothing to
        authenticate (at 500 workers their first calls each made two reads)."""
        worker_id, token = str(uuid.uuid4()), secrets.token_urlsafe(32)
        worker = Worker(
            id=worker_id,
            name=name,
            labels=dict(labels),
            device=dict(device),
            budget_bytes=budget_bytes,
            token_hash=hash_token(token),
        )
        with self.session() as s, s.begin():
            s.add(worker)
        # Every column has a value set here or a client-side default, all loaded at flush.
        _remember(self._known, worker_id, worker)
        _remember(self._by_token, worker.token_hash, worker)
        return worker_id, token

    @retrying
    def authenticate(self, worker_id: str, token: str) -> Worker:
        worker = self._known.get(worker_id)
        if worker is None:
            with self.reading() as s:
                worker = s.get(Worker, worker_id) if plausible_id(worker_id) else None
        return self._token_checked(worker, token)

    def known_worker(self, worker_id: str, token: str) -> Worker | None:
        """:meth:`authenticate` from memory only, for callers that must not block: the
        worker, None if it is not remembered (then ask :meth:`authenticate`), or
        :class:`AuthError` for a remembered worker and a wrong token. One read of the
        memory: a cache starting over meanwhile cannot make it ask the database."""
        worker = self._known.get(worker_id)
        return self._token_checked(worker, token) if worker is not None else None

    def _token_checked(self, worker: Worker | None, token: str) -> Worker:
        """``worker`` if ``token`` is its own (then remembered), else :class:`AuthError`;
        an unknown worker costs the same comparison as a known one."""
        expected = worker.token_hash if worker is not None else hash_token(secrets.token_hex(8))
        if not hmac.compare_digest(expected, hash_token(token)) or worker is None:
            raise AuthError("unknown worker or bad token")
        _remember(self._known, worker.id, worker)
        return worker

    def known_token(self, token: str) -> Worker | None:
        """:meth:`worker_by_token` from memory only: None if not remembered."""
        if not token or len(token) > 200:
            return None
        return self._by_token.get(hash_token(token))

    @retrying
    def worker_by_token(self, token: str) -> Worker | None:
        """The worker holding ``token``, or None. Tokens are 256-bit random strings, so a
        lookup by their hash reveals nothing an attacker could use."""
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        worker = self._by_token.get(digest)
        if worker is None:
            with self.reading() as s:
                worker = s.scalar(select(Worker).where(Worker.token_hash == digest).limit(1))
            if worker is None:
                return None
            _remember(self._by_token, digest, worker)
        return worker

    @retrying
    def heartbeat(self, worker_id: str, state: str, task_id: str | None) -> None:
        """Record a heartbeat in memory; :meth:`flush_heartbeats` writes them together.

        Liveness is only ever read through :meth:`workers` and :meth:`alive_workers`,
        which flush first, so readers in this process never see a stale heartbeat; a
        crash loses at most the heartbeats of one driver tick."""
        with self._beats_lock:
            self._beats[worker_id] = (utcnow(), state, task_id or None)

    def poll_opened(self, worker_id: str) -> None:
        """A long poll of this worker began: a heartbeat now, and until :meth:`poll_closed`
        one whenever liveness is read and its last is getting stale. A worker told
        ``poll_keeps_alive`` sends no heartbeats while it polls: at 500 workers those
        were over half of all calls (docs/benchmarks.md, "Load"). A poll whose peer
        vanished ends at its wait (``max_poll_wait_ms``), so a dead worker looks alive
        at most that much longer than one that stopped beating."""
        with self._beats_lock:
            self._beats[worker_id] = (utcnow(), "idle", None)
            count, _ = self._polls.get(worker_id, (0, 0.0))
            self._polls[worker_id] = (count + 1, time.monotonic())

    def poll_closed(self, worker_id: str) -> None:
        with self._beats_lock:
            count, at = self._polls.pop(worker_id, (0, 0.0))
            if count > 1:
                self._polls[worker_id] = (count - 1, at)

    def _beat_polling(self, stale_after_s: float) -> None:
        """Buffer a heartbeat for every polling worker whose last is older than
        ``stale_after_s`` (caller holds ``_beats_lock``): one row per worker per that
        period, instead of one call per worker per heartbeat interval."""
        now, stamp = time.monotonic(), None
        for worker_id, (count, at) in list(self._polls.items()):
            if now - at >= stale_after_s and worker_id not in self._beats:
                stamp = stamp or utcnow()
                self._beats[worker_id] = (stamp, "idle", None)
                self._polls[worker_id] = (count, now)

    @retrying
    def flush_heartbeats(self, poll_stale_after_s: float | None = None) -> int:
        """Write the buffered heartbeats, polling workers' included (refreshed when their
        last is older than ``poll_stale_after_s``, by default :data:`POLL_BEAT_S`)."""
        with self._beats_lock:
            if self._polls:
                self._beat_polling(
                    POLL_BEAT_S if poll_stale_after_s is None else poll_stale_after_s
                )
            beats, self._beats = self._beats, {}
        if not beats:
            return 0
        rows = [
            {"wid": wid, "at": at, "state": state, "task": task}
            for wid, (at, state, task) in beats.items()
        ]
        try:
            self._write_heartbeats(rows)
        except (OperationalError, InterfaceError):
            with self._beats_lock:  # keep them for the next flush (newer ones win)
                self._beats = {**beats, **self._beats}
            raise
        except Exception:
            # A row the database refuses must not poison the batch (nor be retried
            # forever): write them one by one and drop the ones refused.
            log.exception("a batch of %d heartbeats failed; writing them one by one", len(rows))
            written = 0
            for row in rows:
                try:
                    self._write_heartbeats([row])
                    written += 1
                except (OperationalError, InterfaceError):
                    raise
                except Exception:
                    log.warning("dropped a heartbeat of worker %r the database refused", row["wid"])
            return written
        return len(rows)

    def _write_heartbeats(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(Worker.__table__)
                .where(Worker.__table__.c.id == bindparam("wid"))
                .values(
                    last_heartbeat=bindparam("at"),
                    state=bindparam("state"),
                    current_task=bindparam("task"),
                ),
                rows,
            )

    @retrying
    def workers(self) -> list[Worker]:
        self.flush_heartbeats()
        with self.reading() as s:
            return list(s.scalars(select(Worker).order_by(Worker.registered_at)))

    @retrying
    def alive_workers(self, timeout_s: float) -> list[Worker]:
        alive = self._alive(timeout_s)
        with self.reading() as s:
            return list(s.scalars(select(Worker).where(alive).order_by(Worker.id)))

    def _alive(self, timeout_s: float) -> Any:
        """The condition "heard within ``timeout_s``", buffered heartbeats written first
        (a polling worker's refreshed at a third of the timeout: never near it)."""
        self.flush_heartbeats(timeout_s / 3)
        return Worker.last_heartbeat >= utcnow() - timedelta(seconds=timeout_s)

    # The round driver reads liveness on every tick, and a tick follows every accepted
    # upload: these read columns, not ORM rows (500 Worker objects per tick made the
    # driver quadratic in the fleet, and most of the coordinator's CPU at 500 workers).

    @retrying
    def alive_count(self, timeout_s: float) -> int:
        alive = self._alive(timeout_s)
        with self.reading() as s:
            return int(s.scalar(select(func.count()).where(alive)) or 0)

    @retrying
    def alive_worker_ids(self, timeout_s: float) -> set[str]:
        alive = self._alive(timeout_s)
        with self.reading() as s:
            return set(s.scalars(select(Worker.id).where(alive)))

    @retrying
    def worker_names(self) -> dict[str, str]:
        """Worker id -> name."""
        with self.reading() as s:
            return {wid: name for wid, name in s.execute(select(Worker.id, Worker.name))}

    # -- jobs ------------------------------------------------------------------------------

    @retrying
    def create_job(self, name: str, spec: Mapping[str, Any]) -> str:
        job_id = str(uuid.uuid4())
        with self.session() as s, s.begin():
            s.add(Job(id=job_id, name=name, spec=dict(spec), state="waiting", current_round=0))
        return job_id

    @retrying
    def job(self, job_id: str) -> Job | None:
        if not plausible_id(job_id):
            return None
        with self.reading() as s:
            return s.get(Job, job_id)

    @retrying
    def jobs(self, states: Iterable[str] | None = None) -> list[Job]:
        query = select(Job).order_by(Job.created_at)
        if states is not None:
            query = query.where(Job.state.in_(list(states)))
        with self.reading() as s:
            return list(s.scalars(query))

    @retrying
    def set_job_state(
        self, job_id: str, state: str, *, error: str | None = None, current_round: int | None = None
    ) -> None:
        values: dict[str, Any] = {"state": state, "updated_at": utcnow()}
        if error is not None:
            values["error"] = _storable(error)[:4000]
        if current_round is not None:
            values["current_round"] = current_round
        with self.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id, Job.state != CANCELLED).values(**values))

    @retrying
    def cancel_job(self, job_id: str) -> bool:
        """Cancel an active job in one transaction: open rounds close as ``cancelled`` and
        offered tasks are withdrawn (``abandoned``). False if the job had already ended."""
        with self.session() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.state in ("done", "failed", CANCELLED):
                return False
            now = utcnow()
            job.state, job.updated_at = CANCELLED, now
            s.execute(
                update(Round)
                .where(Round.job_id == job_id, Round.closed_at.is_(None))
                .values(state="cancelled", closed_at=now)
            )
            s.execute(
                update(Task)
                .where(Task.job_id == job_id, Task.status == "offered")
                .values(status="abandoned", reason="job cancelled", updated_at=now)
            )
        return True

    # -- profiles --------------------------------------------------------------------------

    @retrying
    def profiles(self, job_id: str) -> dict[str, Profile]:
        with self.reading() as s:
            rows = s.scalars(select(Profile).where(Profile.job_id == job_id))
            return {p.worker_id: p for p in rows}

    @retrying
    def latest_profiles(self) -> dict[str, Profile]:
        """The newest profile of every worker that has one (any job)."""
        with self.reading() as s:
            out: dict[str, Profile] = {}
            for p in s.scalars(select(Profile).order_by(Profile.created_at, Profile.id)):
                out[p.worker_id] = p
            return out

    # -- rounds and tasks ------------------------------------------------------------------

    @retrying
    def open_round(
        self,
        job_id: str,
        number: int,
        *,
        state: str,
        participants: list[str],
        deadline_at: datetime,
        tasks: list[Task],
    ) -> None:
        """Create (or reset) the round and its tasks, and point the job at it, atomically."""
        with self.session() as s, s.begin():
            existing = s.get(Round, (job_id, number))
            if existing is None:
                s.add(
                    Round(
                        job_id=job_id,
                        number=number,
                        state=state,
                        participants=participants,
                        stragglers=[],
                        metrics={},
                        deadline_at=deadline_at,
                    )
                )
            else:
                existing.state, existing.participants = state, participants
                existing.deadline_at = deadline_at
            s.add_all(tasks)
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state != CANCELLED)
                .values(state=state, current_round=number, updated_at=utcnow())
            )

    @retrying
    def round(self, job_id: str, number: int) -> Round | None:
        with self.reading() as s:
            return s.get(Round, (job_id, number))

    @retrying
    def rounds(self, job_id: str) -> list[Round]:
        with self.reading() as s:
            return list(
                s.scalars(select(Round).where(Round.job_id == job_id).order_by(Round.number))
            )

    @retrying
    def set_round(self, job_id: str, number: int, **values: Any) -> None:
        with self.session() as s, s.begin():
            s.execute(
                update(Round).where(Round.job_id == job_id, Round.number == number).values(**values)
            )

    @retrying
    def close_training(self, job_id: str, number: int, reason: str) -> list[str]:
        """End a round's training in ONE transaction: tasks still offered become stragglers,
        the round and the job move to ``aggregating``. Returns the stragglers' worker ids."""
        with self.session() as s, s.begin():
            late = list(
                s.scalars(
                    select(Task)
                    .where(
                        Task.job_id == job_id,
                        Task.round == number,
                        Task.kind == "train",
                        Task.status == "offered",
                    )
                    .with_for_update()
                )
            )
            now = utcnow()
            for t in late:
                t.status, t.reason, t.updated_at = "straggler", reason, now
            stragglers = [t.worker_id for t in late]
            s.execute(
                update(Round)
                .where(Round.job_id == job_id, Round.number == number)
                .values(state="aggregating", stragglers=stragglers)
            )
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state != CANCELLED)
                .values(state="aggregating", updated_at=now)
            )
        return stragglers

    @retrying
    def task(self, task_id: str) -> Task | None:
        if not plausible_id(task_id):
            return None
        with self.reading() as s:
            return s.get(Task, task_id)

    @retrying
    def tasks(self, job_id: str, number: int, kind: str | None = None) -> list[Task]:
        query = select(Task).where(Task.job_id == job_id, Task.round == number)
        if kind is not None:
            query = query.where(Task.kind == kind)
        with self.reading() as s:
            return list(s.scalars(query.order_by(Task.created_at, Task.id)))

    @retrying
    def task_states(self, job_id: str, number: int, kind: str) -> list[tuple[str, str]]:
        """(worker id, status) of a round's tasks of one kind: what the driver checks on
        every tick, without loading the tasks' modules and scores."""
        query = select(Task.worker_id, Task.status).where(
            Task.job_id == job_id, Task.round == number, Task.kind == kind
        )
        with self.reading() as s:
            return [(wid, status) for wid, status in s.execute(query)]

    @retrying
    def latest_settled_tasks(self, job_id: str | None = None) -> dict[str, Task]:
        """Each worker's most recently settled task (no longer offered), of one job or of all.

        Read models show its reason when it did not complete: a worker's refusal or failure
        stays visible until the worker's next task settles."""
        newest = (
            func.row_number()
            .over(
                partition_by=Task.worker_id,
                order_by=(Task.updated_at.desc(), Task.created_at.desc(), Task.id),
            )
            .label("newest")
        )
        ranked = select(Task.id, newest).where(Task.status != "offered")
        if job_id is not None:
            ranked = ranked.where(Task.job_id == job_id)
        sub = ranked.subquery()
        query = select(Task).join(sub, Task.id == sub.c.id).where(sub.c.newest == 1)
        with self.reading() as s:
            return {t.worker_id: t for t in s.scalars(query)}

    def _first(self, query: Any, **params: Any) -> Any:
        """The first row of ``query``'s columns, read on a connection without a session
        or a transaction; None when there is none."""
        with self._autocommit.connect() as c:
            return c.execute(query, params).first()

    @retrying
    def offered_task(self, worker_id: str) -> TaskOffer | None:
        """The oldest task offered to the worker and not yet finished (re-offered until then)."""
        row = self._first(_OFFERED_TASK, worker_id=worker_id)
        return TaskOffer(*row) if row is not None else None

    @retrying
    def task_state(self, task_id: str) -> TaskState | None:
        row = self._first(_TASK_STATE, task_id=task_id) if plausible_id(task_id) else None
        return TaskState(*row) if row is not None else None

    @retrying
    def upload_target(self, task_id: str) -> UploadTarget | None:
        """The task an upload names, its round's state and any update already stored for
        that worker and round, in one statement (three reads before)."""
        row = self._first(_UPLOAD_TARGET, task_id=task_id) if plausible_id(task_id) else None
        return UploadTarget(*row) if row is not None else None

    @retrying
    def set_task_status(self, task_id: str, status: str, reason: str | None = None) -> None:
        with self.session() as s, s.begin():
            s.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(status=status, reason=reason, updated_at=utcnow())
            )

    @retrying
    def finish_profile_task(
        self, task_id: str, job_id: str, worker_id: str, profile: Mapping[str, Any]
    ) -> None:
        """Store the profile (replacing this worker's earlier one for the job) and mark its
        task done, in one transaction of two Core statements: every worker reports once
        a job, all in the same round, and the ORM's read, flush and update took 7% of the
        coordinator's time at 500 workers."""
        table = Profile.__table__
        columns = {**profile, "created_at": utcnow()}
        upsert = _UPSERTS[self.engine.dialect.name]  # INSERT ... ON CONFLICT, both dialects
        insert_ = upsert(table).values(job_id=job_id, worker_id=worker_id, **columns)
        insert_ = insert_.on_conflict_do_update(
            index_elements=[table.c.job_id, table.c.worker_id],
            set_={key: insert_.excluded[key] for key in columns},
        )
        with self.engine.begin() as conn:
            conn.execute(insert_)
            # A late profile is kept for the next round; its task stays a straggler.
            conn.execute(_finish_offered(task_id))

    # -- updates ---------------------------------------------------------------------------

    @staticmethod
    def _existing_update_id(conn: Connection, row: Update) -> int | None:
        updates = Update.__table__.c
        return conn.scalar(
            select(updates.id).where(
                updates.job_id == row.job_id,
                updates.round == row.round,
                updates.worker_id == row.worker_id,
            )
        )

    @retrying
    def record_update(
        self, row: Update, before_commit: Callable[[], object] | None = None
    ) -> UpdateRecord:
        """Insert the update and finish its task; the same (job, round, worker) counts once.

        ``before_commit`` runs after the row is inserted (so the database accepted it) and
        before the transaction commits: the upload makes its blob visible there, so a
        refused row never leaves a blob behind. Core statements, not the ORM's unit of
        work: every worker writes here once a round, and the ORM's update and flush were
        14% of the coordinator's time at 500 workers (docs/benchmarks.md, "Load")."""
        tasks, updates = Task.__table__.c, Update.__table__
        # id from its sequence, received_at from the column default
        values = {
            c.key: getattr(row, c.key) for c in updates.c if c.key not in ("id", "received_at")
        }
        try:
            with self.engine.begin() as conn:
                # Finishing the task locks its row, so a round closing at this moment
                # either sees it done or has made it a straggler, and then nothing counts.
                finished = conn.execute(_finish_offered(row.task_id).returning(tasks.id)).first()
                if finished is None:
                    existing = self._existing_update_id(conn, row)
                    if existing is not None:
                        return UpdateRecord(existing, True)
                    status = conn.scalar(select(tasks.status).where(tasks.id == row.task_id))
                    raise TaskClosed(f"task {row.task_id} is {status or 'missing'}, no longer open")
                update_id = conn.execute(
                    insert(updates).values(values).returning(updates.c.id)
                ).scalar_one()
                if before_commit is not None:
                    before_commit()
                return UpdateRecord(update_id, False)
        except IntegrityError:
            # A concurrent retry of the same upload won the race.
            with self._autocommit.connect() as conn:
                existing = self._existing_update_id(conn, row)
            if existing is None:
                raise
            return UpdateRecord(existing, True)

    @retrying
    def updates(self, job_id: str, number: int) -> list[Update]:
        with self.reading() as s:
            return list(
                s.scalars(
                    select(Update)
                    .where(Update.job_id == job_id, Update.round == number)
                    .order_by(Update.id)
                )
            )

    @retrying
    def record_rejection(
        self,
        reason: str,
        message: str,
        *,
        job_id: str | None = None,
        round_number: int | None = None,
        worker_id: str | None = None,
    ) -> None:
        with self.session() as s, s.begin():
            s.add(
                Rejection(
                    job_id=job_id if job_id is None or plausible_id(job_id) else None,
                    round=round_number
                    if round_number is not None and 0 <= round_number < INT32
                    else None,
                    worker_id=worker_id if worker_id is None or plausible_id(worker_id) else None,
                    reason=_storable(reason)[:60],
                    message=_storable(message)[:2000],
                )
            )

    @retrying
    def rejections(self, job_id: str) -> list[Rejection]:
        with self.reading() as s:
            return list(
                s.scalars(
                    select(Rejection).where(Rejection.job_id == job_id).order_by(Rejection.id)
                )
            )

    # -- adapter versions and module statistics -------------------------------------------

    @retrying
    def has_version(self, job_id: str) -> bool:
        """Whether the job has a global adapter yet: asked by every profile report, most
        of them before the first version exists. One column read, and once true it
        stays true (versions are never deleted), so it is remembered."""
        if job_id in self._with_version:
            return True
        found = self._first(_ANY_VERSION, job_id=job_id) is not None
        if found:
            if len(self._with_version) >= 4096:
                self._with_version.clear()
            self._with_version.add(job_id)
        return found

    @retrying
    def latest_version(self, job_id: str) -> AdapterVersion | None:
        with self.reading() as s:
            return s.scalar(
                select(AdapterVersion)
                .where(AdapterVersion.job_id == job_id)
                .order_by(AdapterVersion.version.desc())
                .limit(1)
            )

    @retrying
    def version(self, job_id: str, version: int) -> AdapterVersion | None:
        if not plausible_id(job_id) or not 0 <= version < INT32:
            return None
        row = self._versions.get((job_id, version))
        if row is None:
            with self.reading() as s:
                row = s.get(AdapterVersion, (job_id, version))
            if row is not None:
                _remember(self._versions, (job_id, version), row)
        return row

    @retrying
    def versions(self, job_id: str) -> list[AdapterVersion]:
        with self.reading() as s:
            return list(
                s.scalars(
                    select(AdapterVersion)
                    .where(AdapterVersion.job_id == job_id)
                    .order_by(AdapterVersion.version)
                )
            )

    @retrying
    def module_stats(self, job_id: str) -> dict[str, ModuleStats]:
        with self.reading() as s:
            rows = s.scalars(select(ModuleStat).where(ModuleStat.job_id == job_id))
            return {r.module: ModuleStats(r.update_count, r.last_round, r.score) for r in rows}

    @retrying
    def commit_version(
        self,
        job_id: str,
        *,
        version: int,
        round_number: int,
        sha256: str,
        byte_count: int,
        stats: Mapping[str, ModuleStats] | None = None,
        close_round: Mapping[str, Any] | None = None,
        job_state: str | None = None,
    ) -> bool:
        """Commit a global adapter version, module statistics, the round's closing and the
        job's next state in ONE transaction. Returns False if the version already exists
        (a retry after a crash), changing nothing."""
        with self.session() as s, s.begin():
            if s.get(AdapterVersion, (job_id, version)) is not None:
                return False
            parent = s.scalar(
                select(AdapterVersion.sha256).where(
                    AdapterVersion.job_id == job_id, AdapterVersion.version == version - 1
                )
            )
            s.add(
                AdapterVersion(
                    job_id=job_id,
                    version=version,
                    round=round_number,
                    sha256=sha256,
                    parent_sha256=parent,
                    byte_count=byte_count,
                )
            )
            for module, st in (stats or {}).items():
                row = s.get(ModuleStat, (job_id, module))
                if row is None:
                    row = ModuleStat(job_id=job_id, module=module)
                    s.add(row)
                row.update_count, row.last_round, row.score = (
                    st.update_count,
                    st.last_round,
                    st.score,
                )
            if close_round is not None:
                s.execute(
                    update(Round)
                    .where(Round.job_id == job_id, Round.number == round_number)
                    .values(closed_at=utcnow(), **close_round)
                )
            if job_state is not None:
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state != CANCELLED)
                    .values(state=job_state, updated_at=utcnow())
                )
        return True

    @retrying
    def referenced_blobs(self) -> set[str]:
        """Every sha256 a row points at (updates and adapter versions)."""
        with self.reading() as s:
            return set(s.scalars(select(Update.sha256))) | set(
                s.scalars(select(AdapterVersion.sha256))
            )

    @retrying
    def count(self, model: type[Any]) -> int:
        with self.reading() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)
