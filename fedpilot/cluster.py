"""A local cluster of real processes: one coordinator and N workers on loopback.

Used by ``fedpilot demo``, the quality benchmark and the end-to-end tests, so
all three exercise exactly what an operator runs: separate OS processes
talking gRPC over sockets, state in the database, SIGTERM to stop.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fedpilot.coordinator.db.store import Store, database_url


def write_csv(path: Path, texts: Sequence[str], labels: Sequence[str]) -> Path:
    """A training or evaluation file in the format workers read: ``text,label``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    return path


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands, read from the coordinator's database (what a progress display shows)."""

    state: str
    """The job's state: waiting, profiling, training, aggregating, evaluating, done, ..."""
    round: int
    rounds: int
    workers: int
    """Workers registered with the coordinator."""
    tasks_done: int
    """Tasks of the current phase (profile or train tasks of the current round) finished..."""
    tasks: int
    """...of this many (refused ones not counted)."""
    refused: int
    """Tasks of the current phase refused (the REST API and dashboard say why)."""
    evaluated: tuple[tuple[int, dict[str, float]], ...]
    """(round, metrics) of every round evaluated so far, oldest first."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def phase(self) -> str:
        """One line for the current phase, e.g. ``round 2/8: training, 3/4 updates``."""
        if self.state == "waiting":
            number, detail = self.round + 1, f" for workers ({self.workers} registered)"
        else:
            number, detail = self.round, ""
            what = {"profiling": "workers profiled", "training": "updates in"}.get(self.state)
            if what and self.tasks:
                detail = f", {self.tasks_done}/{self.tasks} {what}"
            if self.refused:
                detail += f", {self.refused} refused"
        return f"round {min(number, self.rounds)}/{self.rounds}: {self.state}{detail}"


class LocalCluster:
    """Start, watch and stop the processes of a one-machine federation."""

    def __init__(
        self,
        work_dir: Path,
        *,
        db_url: str = "",
        log_level: str = "info",
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``env``: added to every process's environment (``FEDPILOT_*`` settings)."""
        self.work_dir = Path(work_dir)
        self.env = dict(env or {})
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.work_dir / "coordinator"
        self.db_url = db_url or os.environ.get("FEDPILOT_DATABASE_URL", "")
        self.log_level = log_level
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.address = ""
        self.http_url = ""
        self._store: Store | None = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work_dir / f"{name}.log").open("ab")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **self.env,
        }
        if self.db_url:
            env["FEDPILOT_DATABASE_URL"] = self.db_url
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpilot.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def start_coordinator(
        self,
        *,
        job: Path | None = None,
        evaluate: bool = True,
        port: int = 0,
        http_port: int = 0,
        timeout_s: float = 120,
    ) -> str:
        """Start (or restart on ``port``) the coordinator; returns its gRPC address.

        The REST API and dashboard are then at :attr:`http_url`."""
        port_file = self.work_dir / "coordinator.port"
        http_port_file = self.work_dir / "coordinator.http-port"
        port_file.unlink(missing_ok=True)
        http_port_file.unlink(missing_ok=True)
        args = [
            "coordinator",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(port),
            "--port-file",
            str(port_file),
            "--http-port",
            str(http_port),
            "--http-port-file",
            str(http_port_file),
            "--log-level",
            self.log_level,
        ]
        if self.db_url:
            args += ["--database-url", self.db_url]
        if job is not None:
            args += ["--job", str(job)]
        if not evaluate:
            args.append("--no-evaluate")
        proc = self._spawn("coordinator", args)
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {proc.returncode}; see "
                    f"{self.work_dir / 'coordinator.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("coordinator did not start in time")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        if http_port_file.exists():
            self.http_url = f"http://127.0.0.1:{http_port_file.read_text().strip()}"
        return self.address

    def start_worker(
        self,
        name: str,
        data: Path,
        budget_bytes: int,
        labels: dict[str, str] | None = None,
        threads: int = 1,
        metrics_port: int | None = None,
        device: str = "cpu",
    ) -> subprocess.Popen[bytes]:
        """One worker process; ``threads`` torch threads so co-located workers share cores."""
        args = [
            "worker",
            "--coordinator",
            self.address,
            "--name",
            name,
            "--data",
            str(data),
            "--memory-budget",
            str(budget_bytes),
            "--log-level",
            self.log_level,
            "--threads",
            str(threads),
            "--device",
            device,
        ]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
        return self._spawn(name, args)

    def check_processes(self) -> None:
        """Raise if a process of the cluster has exited, naming it and its log."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited ({proc.returncode}); see {self.work_dir / (name + '.log')}"
                )

    def progress(self, job_id: str) -> JobProgress:
        """A snapshot of the job's progress for a display (read-only)."""
        store = self.store
        job = store.job(job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        rounds = store.rounds(job_id)
        kind = {"profiling": "profile", "training": "train"}.get(job.state)
        tasks = store.tasks(job_id, job.current_round, kind) if kind else []
        refused = sum(t.status == "refused" for t in tasks)
        return JobProgress(
            state=job.state,
            round=job.current_round,
            rounds=int((job.spec or {}).get("rounds", 0)),
            workers=len(store.workers()),
            tasks_done=sum(t.status == "done" for t in tasks),
            tasks=len(tasks) - refused,
            refused=refused,
            evaluated=tuple(
                (r.number, dict(r.metrics)) for r in rounds if "eval_accuracy" in (r.metrics or {})
            ),
            error=job.error,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one process (and its group) the hard way, as a crash would."""
        proc = self.processes[name]
        os.killpg(proc.pid, sig)
        proc.wait()

    @property
    def store(self) -> Store:
        """The coordinator's database, opened read-mostly for watching progress."""
        if self._store is None:
            self._store = Store.open(self.db_url or database_url(self.data_dir), upgrade=False)
        return self._store

    def stop(self, timeout_s: float = 20) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._store is not None:
            self._store.engine.dispose()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
