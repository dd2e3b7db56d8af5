"""The `fedpilot` command as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedpilot.core.strategies import Strategy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plan.json"


def fedpilot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", *args], capture_output=True, text=True, check=False
    )


def test_plan_json_respects_every_budget() -> None:
    spec = json.loads(EXAMPLE.read_text())
    result = fedpilot("plan", str(EXAMPLE), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)["clients"]
    budgets = {c["name"]: c["budget_bytes"] for c in spec["clients"]}
    assert [c["name"] for c in out] == list(budgets)
    for c in out:
        assert set(c) >= {"name", "modules", "predicted_bytes", "value", "feasible"}
        if c["feasible"]:
            assert c["predicted_bytes"] <= budgets[c["name"]]
        else:
            assert c["modules"] == [] and "M0=" in c["reason"]
    # richer clients train more
    counts = [len(c["modules"]) for c in out if c["feasible"]]
    assert counts == sorted(counts)


@pytest.mark.parametrize("strategy", [s.value for s in Strategy])
def test_plan_runs_every_strategy(tmp_path: Path, strategy: str) -> None:
    spec = json.loads(EXAMPLE.read_text())
    spec["strategy"] = strategy
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(spec))
    result = fedpilot("plan", str(path), "--json")
    assert result.returncode == 0, result.stderr


def test_plan_table_is_readable() -> None:
    result = fedpilot("plan", str(EXAMPLE))
    assert result.returncode == 0
    assert "edge-gpu-a" in result.stdout and "sits out" in result.stdout


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s["clients"][1].__setitem__("budget_bytes", -5), "clients.1.budget_bytes"),
        (lambda s: s["modules"][0].__setitem__("layer", 99), "modules.0.layer"),
        (lambda s: s.__setitem__("strategy", "best"), "strategy"),
        (lambda s: s["clients"][0]["scores"].__setitem__("ghost", 1.0), "clients.0.scores"),
        (lambda s: s.pop("base_bytes"), "base_bytes"),
        (lambda s: s["modules"].append(dict(s["modules"][0])), "duplicate"),
    ],
)
def test_bad_plan_files_name_the_field_and_exit_2(tmp_path: Path, edit, field: str) -> None:
    spec = json.loads(EXAMPLE.read_text())
    edit(spec)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(spec))
    result = fedpilot("plan", str(path))
    assert result.returncode == 2
    assert field in result.stderr


def test_unreadable_and_non_json_files_exit_2(tmp_path: Path) -> None:
    assert fedpilot("plan", str(tmp_path / "missing.json")).returncode == 2
    (tmp_path / "x.json").write_text("{not json")
    result = fedpilot("plan", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bench_solver_prints_json_lines() -> None:
    result = fedpilot(
        "bench",
        "solver",
        "--clients",
        "30",
        "--repeats",
        "1",
        "--small-instances",
        "5",
        "--layers",
        "4",
    )
    assert result.returncode == 0, result.stderr
    rows = _json_lines(result.stdout)
    solver = [r for r in rows if r["bench"] == "solver"]
    assert {r["strategy"] for r in solver} == {"fedpilot", "random", "top-down", "uniform", "full"}
    assert all(r["budget_violations"] == 0 and r["seconds"] > 0 for r in solver)
    optimality = next(r for r in rows if r["bench"] == "solver_optimality")
    assert optimality["optimal_rate"] == 1.0


def test_bench_aggregate_prints_throughput_against_memcpy() -> None:
    result = fedpilot("bench", "aggregate", "--clients", "3", "--merge", "factors")
    assert result.returncode == 0, result.stderr
    (row,) = _json_lines(result.stdout)
    assert row["bench"] == "aggregate" and row["clients"] == 3
    assert row["gb_per_s"] > 0 and row["memcpy_gb_per_s"] > 0
    # Each field is rounded on its own: compare within their rounding, not exactly.
    assert row["ratio_to_memcpy"] == pytest.approx(
        row["gb_per_s"] / row["memcpy_gb_per_s"], rel=0.02, abs=1e-3
    )


def test_bench_transfer_compares_the_real_path_with_grpc_and_tcp() -> None:
    result = fedpilot("bench", "transfer", "--size-mib", "8")
    assert result.returncode == 0, result.stderr
    lines = _json_lines(result.stdout)
    rows = [r for r in lines if r["bench"] == "transfer"]
    assert {r["direction"] for r in rows} == {"upload", "download"}
    for r in rows:
        assert r["bytes"] == 8 * 2**20
        assert r["mb_per_s"] > 0 and r["ratio_to_grpc"] > 0 and r["ratio_to_tcp"] > 0
        assert r["coordinator_peak_rss_bytes"] > 0
    parts = {r["direction"]: r for r in lines if r["bench"] == "transfer_breakdown"}
    # Every step's cost is reported per direction for the same payload (header included),
    # next to the real path's time and the bare stream's.
    assert set(parts) == {"upload", "download"}
    steps = {
        "upload": ("encode_blake3", "blake3_check", "sha256_content_address", "file_write"),
        "download": ("file_read", "proto_parse", "blake3_check", "assemble", "finite_scan"),
    }
    for direction, row in parts.items():
        assert row["bytes"] > 8 * 2**20
        for step in steps[direction]:
            assert row[f"{step}_s"] > 0 and row[f"{step}_mb_per_s"] > 0
        assert row["serial_s"] > row["network_s"] > 0 and row["measured_s"] > 0


# -- a worker refusing its tasks, as the operator sees it ------------------------------------


def _wait(check, timeout_s: float, cluster) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, (cluster.work_dir / f"{name}.log").read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError((cluster.work_dir / "coordinator.log").read_text()[-3000:])


def test_a_refusing_worker_says_why_in_status_workers_and_the_api(tmp_path, tiny_dir) -> None:
    """A worker whose data holds none of the job's labels refuses every task; the reason it
    sends reaches `fedpilot status`, `fedpilot workers` and the REST read models."""
    from fedpilot.cluster import LocalCluster, write_csv

    spec = {
        "name": "wrong-data",
        "model": str(tiny_dir),
        "labels": ["class0", "class1", "class2"],
        "rounds": 1,
        "min_workers": 1,
        "batch_size": 4,
        "max_seq_len": 16,
        "lora": {"rank": 4, "alpha": 8},
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    data = write_csv(tmp_path / "other.csv", [f"query {i}" for i in range(12)], ["elsewhere"] * 12)
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        cluster.start_worker("site-a", data, 2**30)
        (job,) = cluster.store.jobs()
        api = cluster.http_url

        def refused() -> dict | None:
            detail = httpx.get(f"{api}/api/v1/jobs/{job.id}").json()
            return detail if detail["problems"] else None

        detail = _wait(refused, 120, cluster)
        (problem,) = detail["problems"]
        assert detail["state"] in ("waiting", "profiling")  # nothing was trained
        assert problem["worker_name"] == "site-a" and problem["status"] == "refused"
        assert problem["reason"] == "MALFORMED" and problem["kind"] == "profile"
        assert "none of its 12 examples has one of the job's labels" in problem["message"]
        (worker,) = httpx.get(f"{api}/api/v1/workers").json()
        assert worker["problem"]["reason"] == "MALFORMED"
        assert worker["problem"]["message"] == problem["message"]

        wide = {**os.environ, "COLUMNS": "400"}  # one line per row: easy to read back
        status = subprocess.run(
            [sys.executable, "-m", "fedpilot.cli", "status", job.id, "--api", api],
            capture_output=True,
            text=True,
            env=wide,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert "site-a" in status.stdout and "MALFORMED (round" in status.stdout
        assert "none of its 12 examples has one of the job's labels" in status.stdout
        workers = subprocess.run(
            [sys.executable, "-m", "fedpilot.cli", "workers", "--api", api],
            capture_output=True,
            text=True,
            env=wide,
            check=False,
        )
        assert workers.returncode == 0, workers.stderr
        row = next(line for line in workers.stdout.splitlines() if "site-a" in line)
        assert "MALFORMED (round" in row and "none of its 12 examples" in row
