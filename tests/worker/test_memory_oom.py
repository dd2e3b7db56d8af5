"""An allocation that fails inside a task ends the task, not the worker.

A real worker process trains MiniLM for a real coordinator. While it holds its
training task with the job loaded, the test caps the process's address space
(``prlimit RLIMIT_AS``) below what the task's activations need, so torch's CPU
allocator fails inside the task, as the CUDA allocator does beyond its cap.
The worker must catch it, refuse the task with ``OUT_OF_MEMORY`` and the
numbers, and stay up.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import pytest

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.datasets import banking77_dir
from fedpilot.worker.data import load_csv, select

HOLD_LINE = "fault injection: holding the training task"


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _until(what: str, check: Any, logs: Any, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{logs()}")


def test_allocation_failure_in_a_task_is_refused_as_out_of_memory(tmp_path, monkeypatch) -> None:
    # Prepare: one worker, one round of MiniLM at batch 16 x 64 tokens.
    data = select(load_csv(banking77_dir() / "train.csv"), classes=4, per_class=24)
    names = list(data.label_names)
    csv = write_csv(tmp_path / "train.csv", data.texts, [names[y] for y in data.labels])
    job = {
        "name": "oom",
        "labels": names,
        "rounds": 1,
        "min_workers": 1,
        "local_steps": 3,
        "batch_size": 16,
        "max_seq_len": 64,
        "round_deadline_s": 300,
        "ig_probe_batches": 1,
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    monkeypatch.setenv("FEDPILOT_FAULT_TRAIN_DELAY_S", "6")

    with LocalCluster(tmp_path / "cluster") as cluster:

        def logs() -> str:
            return "\n".join(
                f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                for p in sorted(cluster.work_dir.glob("*.log"))
            )

        def worker_log() -> str:
            path = cluster.work_dir / "w.log"
            return path.read_text(errors="replace") if path.exists() else ""

        cluster.start_coordinator(job=job_file, evaluate=False)
        worker = cluster.start_worker("w", csv, 2**31)
        (job_row,) = cluster.store.jobs()
        _until("the training task's hold", lambda: HOLD_LINE in worker_log(), logs)

        # Execute: 16 MiB more address space than the idle worker has; the task needs
        # well over 100 MiB of activations.
        soft, hard = resource.prlimit(worker.pid, resource.RLIMIT_AS)
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (_vm_size(worker.pid) + 2**24, hard))
        (task,) = _until(
            "the task to end",
            lambda: [
                t for t in cluster.store.tasks(job_row.id, 1, "train") if t.status != "offered"
            ],
            logs,
        )
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (soft, hard))

        # Assert: refused with the reason and the numbers; the worker lives on and polls.
        assert task.status == "refused", logs()
        assert "out of memory" in (task.reason or ""), task.reason
        assert "budget 2147483648" in (task.reason or ""), task.reason
        assert cluster.store.updates(job_row.id, 1) == []
        time.sleep(3)
        assert worker.poll() is None, logs()
        assert "ran out of memory" in worker_log()
        workers = cluster.store.workers()
        assert len(workers) == 1 and workers[0].name == "w"


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not Path("/proc/self/status").exists():
        pytest.fail("this test reads /proc and sets RLIMIT_AS: it needs Linux")
