"""The memory guarantee, measured by a meter the worker does not own.

A real coordinator and a real worker (separate processes, gRPC) run a job on the
bundled MiniLM while the worker's process tree sits in a memory cgroup this test
created. The kernel meters it (``memory.max_usage_in_bytes``) and enforces the
limit the test sets (``memory.limit_in_bytes``):

- at what the budget promises (the idle worker with the job loaded, less the
  weights, plus the host reserve, plus the budget), the job finishes and no
  process of the group is OOM-killed;
- 30% below what the assignment needs, the task fails: the kernel kills the
  worker (the negative control that proves the meter bites).

The limit is set while the worker holds its training task with the job loaded
(``FEDPILOT_FAULT_TRAIN_DELAY_S``), the moment the budget's baseline is defined.
Runs as root (CI does); without a writable memory cgroup it fails, saying so.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.datasets import banking77_dir
from fedpilot.worker.budget import (
    HOST_RESERVE_BYTES,
    CgroupError,
    MemoryCgroup,
    create_child_cgroup,
)
from fedpilot.worker.data import load_csv, select
from fedpilot.worker.model import ModelSpec, load_model
from fedpilot.worker.profiling import dummy_batch, profile_memory, weight_bytes

BATCH, SEQ, CLASSES, HOLD_S = 16, 64, 4, 8
HOLD_LINE = "fault injection: holding the training task"


@pytest.fixture()
def meter() -> Iterator[MemoryCgroup]:
    """A memory cgroup of the test's own, removed afterwards with anything left below it."""
    try:
        group = create_child_cgroup("fedpilot-test-meter-")
    except (CgroupError, OSError) as e:
        pytest.fail(
            f"this test needs a writable memory cgroup (run as root with the cgroup v1 memory "
            f"controller or a delegated v2 memory cgroup): {e}"
        )
    yield group
    for child in sorted(group.path.glob("*/"), reverse=True):
        if (child / "cgroup.procs").exists():
            with contextlib.suppress(OSError):
                child.rmdir()
    group.remove()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Data, job and budget shared by both runs: BANKING77 on MiniLM, the budget fitting
    every module by 5%, measured as the worker measures it."""
    work = tmp_path_factory.mktemp("memory-cgroup")
    data = select(load_csv(banking77_dir() / "train.csv"), classes=CLASSES, per_class=24)
    names = list(data.label_names)
    csv = write_csv(work / "train.csv", data.texts, [names[y] for y in data.labels])
    spec = ModelSpec(
        num_labels=CLASSES, lora_rank=8, lora_alpha=16, max_seq_len=SEQ, batch_size=BATCH
    )
    model = load_model(spec)
    memory = profile_memory(model, dummy_batch(model, BATCH, SEQ))
    job = {
        "name": "memory-meter",
        "labels": names,
        "rounds": 1,
        "min_workers": 1,
        "local_steps": 3,
        "batch_size": BATCH,
        "max_seq_len": SEQ,
        "learning_rate": 0.005,
        "round_deadline_s": 300,
        "lora": {"rank": 8, "alpha": 16},
        "ig_probe_batches": 1,
    }
    return {
        "work": work,
        "csv": csv,
        "job": job,
        "budget": int(memory.full_cost() * 1.05),
        "weights": weight_bytes(model),
    }


def _oom_kills(group: MemoryCgroup) -> int:
    """OOM kills in ``group`` and below: cgroup v1 counts a kill in the victim's own group
    (here the worker's cgroup inside the test's), not in the group whose limit was hit."""
    groups = [group] + [
        MemoryCgroup(child, group.version)
        for child in group.path.rglob("*")
        if child.is_dir() and (child / "cgroup.procs").exists()
    ]
    return sum(g.oom_kills for g in groups)


def _log(cluster: LocalCluster, name: str) -> str:
    path = cluster.work_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _logs(cluster: LocalCluster) -> str:
    return "\n".join(f"--- {n} ---\n{_log(cluster, n)[-3000:]}" for n in cluster.processes)


def _until(cluster: LocalCluster, what: str, check: Any, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{_logs(cluster)}")


def _run(
    setup: dict[str, Any],
    meter: MemoryCgroup,
    name: str,
    limit_above_baseline: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    """Start a cluster with the worker in ``meter``; when the worker holds its training task
    with the job loaded, limit the group to baseline + ``limit_above_baseline(task)``; then
    let the task run and return what happened."""
    monkeypatch.setenv("FEDPILOT_FAULT_TRAIN_DELAY_S", str(HOLD_S))
    job_file = setup["work"] / f"{name}.json"
    job_file.write_text(json.dumps(setup["job"]))
    with LocalCluster(setup["work"] / name) as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        worker = cluster.start_worker("w", setup["csv"], setup["budget"])
        meter.add(worker.pid)  # before its imports; earlier charges move along
        (job,) = cluster.store.jobs()
        _until(cluster, "the training task's hold", lambda: HOLD_LINE in _log(cluster, "w"))
        assert worker.poll() is None, _logs(cluster)
        (task,) = cluster.store.tasks(job.id, 1, "train")
        baseline = meter.usage - setup["weights"] + HOST_RESERVE_BYTES
        limit = baseline + int(limit_above_baseline(task))
        oom_before, failures_before = _oom_kills(meter), meter.failcnt
        meter.set_limit(limit)
        meter.reset_max_usage()

        def ended() -> Any:
            current = cluster.store.job(job.id)
            if worker.poll() is not None:
                return "worker exited"
            if current is not None and current.state in ("done", "failed", "cancelled"):
                return current.state
            return None

        outcome = _until(cluster, "the job or the worker to end", ended)
        return {
            "outcome": outcome,
            "job": cluster.store.job(job.id),
            "updates": cluster.store.updates(job.id, 1),
            "task": task,
            "returncode": worker.poll(),
            "baseline": baseline,
            "limit": limit,
            "peak": meter.max_usage,
            "oom_kills": _oom_kills(meter) - oom_before,
            "limit_hits": meter.failcnt - failures_before,
            "logs": _logs(cluster),
        }


def test_job_fits_a_hard_limit_at_the_budget(setup, meter, monkeypatch) -> None:
    # Execute: the limit is exactly what the budget promises.
    run = _run(setup, meter, "at-budget", lambda task: setup["budget"], monkeypatch)

    # Assert: done, nothing killed, and the kernel's meter stayed within the promise.
    assert run["outcome"] == "done", f"{run['job'].error if run['job'] else ''}\n{run['logs']}"
    assert run["returncode"] is None and run["oom_kills"] == 0, run["logs"]
    assert len(run["updates"]) == 1
    assert run["task"].predicted_bytes <= setup["budget"]
    assert run["task"].modules  # something was trained under the limit
    assert run["peak"] <= run["limit"]
    print(
        f"budget {setup['budget']}, baseline {run['baseline']}, peak above baseline "
        f"{run['peak'] - run['baseline']} bytes (predicted {run['task'].predicted_bytes})"
    )


def test_limit_30_percent_below_the_assignment_kills_the_task(setup, meter, monkeypatch) -> None:
    # Execute: the negative control, 30% below what the assignment needs.
    run = _run(setup, meter, "below", lambda task: 0.7 * task.predicted_bytes, monkeypatch)

    # Assert: the kernel stopped the task: the worker was OOM-killed, nothing uploaded.
    assert run["outcome"] == "worker exited", run["logs"]
    assert run["returncode"] == -9, run["logs"]
    assert run["oom_kills"] >= 1 and run["limit_hits"] >= 1
    assert run["updates"] == []
