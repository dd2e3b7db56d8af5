"""Tables of the coordinator's state (SQLAlchemy 2, typed).

Schema changes go through Alembic (``coordinator/db/migrations``); a test
checks that the migrated schema equals these models on SQLite and PostgreSQL.
Adapter tensors are not stored here: rows reference blobs by sha256.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use fedpilot's utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(20), index=True)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    labels: Mapped[dict[str, Any]]
    device: Mapped[dict[str, Any]]
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    token_hash: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(20), default="idle")
    current_task: Mapped[str | None] = mapped_column(String(36))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Profile(Base):
    """A worker's measured memory model for one job's configuration."""

    __tablename__ = "profiles"
    __table_args__ = (UniqueConstraint("job_id", "worker_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    memory: Mapped[dict[str, Any]]
    """The ``fedpilot plan`` format: modules, layer_activation_bytes, base_bytes."""
    tensors: Mapped[dict[str, Any]]
    """Shapes of every adapter tensor: ``{"module/tensor": [dims]}``."""
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[str] = mapped_column(String(40))
    device: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Round(Base):
    __tablename__ = "rounds"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(20))
    participants: Mapped[list[Any]]
    stragglers: Mapped[list[Any]]
    metrics: Mapped[dict[str, Any]]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Task(Base):
    """Work offered to one worker: a profile request or a training assignment."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_worker_status", "worker_id", "status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))
    modules: Mapped[list[Any]]
    predicted_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    value: Mapped[float] = mapped_column(Float, default=0.0)
    scores: Mapped[dict[str, Any]]
    adapter_version: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(12))
    """offered, done, refused, straggler, abandoned."""
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Update(Base):
    """One accepted upload. Unique per (job, round, worker): the same update counts once."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("job_id", "round", "worker_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    task_id: Mapped[str] = mapped_column(String(36), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    byte_count: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(BigInteger)
    loss_before: Mapped[float] = mapped_column(Float)
    loss_after: Mapped[float] = mapped_column(Float)
    local_scores: Mapped[dict[str, Any]]
    predicted_bytes: Mapped[int] = mapped_column(BigInteger)
    measured_peak_bytes: Mapped[int] = mapped_column(BigInteger)
    train_seconds: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AdapterVersion(Base):
    """A committed global adapter; ``parent_sha256`` chains versions of a job."""

    __tablename__ = "adapter_versions"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    parent_sha256: Mapped[str | None] = mapped_column(String(64))
    byte_count: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModuleStat(Base):
    __tablename__ = "module_stats"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    module: Mapped[str] = mapped_column(String(300), primary_key=True)
    update_count: Mapped[int] = mapped_column(Integer, default=0)
    last_round: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)


class Rejection(Base):
    """An upload or request refused, with the reason the sender was given."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(36))
    reason: Mapped[str] = mapped_column(String(60))
    message: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
