"""`fedpilot bench load` at a few workers: the harness runs the real protocol end to end."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fedpilot.cli import app


@pytest.mark.slow
def test_bench_load_reports_every_field_with_no_errors(pg_url: str) -> None:
    # Two counts back to back on one database: the second must not see the first's
    # workers (they would count as alive, be drawn, never answer and hold round 1).
    result = CliRunner().invoke(
        app,
        [
            "bench", "load", "--workers", "6", "--workers", "6",
            "--database-url", pg_url, "--timeout-s", "240",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first, row = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert first["updates_per_round"] == [6, 6] and first["errors"] == 0
    with create_engine(pg_url).connect() as conn:
        left = conn.execute(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_load_%'")
        ).all()
    assert left == [], "bench load left its schemas behind"
    assert row["bench"] == "load" and row["workers"] == 6 and row["database"] == "postgresql"
    assert row["errors"] == 0, row["error_samples"]
    assert row["rounds_closed"] == 2 and row["updates_per_round"] == [6, 6]
    assert row["no_update_counted_twice"] is True
    assert row["registrations_per_s"] > 0 and row["coordinator_peak_rss_bytes"] > 0
    assert row["per_round"]["coordinator_cpu_s"] > 0 and row["per_round"]["cores"] >= 1
    assert 0 < row["rpc_p50_ms"] <= row["rpc_p99_ms"]
    # Every run registers, profiles, downloads and uploads; a heartbeat only when the
    # run outlasts the 2 s interval, which two rounds of six workers need not.
    assert set(row["by_method_p99_ms"]) >= {"Register", "ReportProfile", "UploadUpdate"}
    # The bench's small adapter rides inside each training task: no download call.
    assert "DownloadAdapter" not in row["by_method_p99_ms"]
    # Six workers are far below heartbeats_per_s x interval: the configured 2 s interval,
    # learnt from the coordinator's answers, and default gRPC limits.
    assert row["heartbeat_interval_s"] == 2.0
    assert row["errors_by_call"] == {}
    # Read from the coordinator's /metrics: six workers overload nothing.
    assert row["resent_calls"] == sum(row["resent_by_call"].values()) == 0
    assert row["coordinator_settings"] == {"FEDPILOT_GRPC_MAX_CONCURRENT_RPCS": "2048"}


def test_resent_calls_are_read_from_the_coordinators_metrics(tmp_path) -> None:
    """What the bench reports as ``resent_by_call`` is the coordinator's own counter, as its
    HTTP /metrics serves it (the 6-worker run above resends nothing, so it reads zeros)."""
    from fedpilot.bench.load import _resent_calls
    from fedpilot.coordinator import metrics
    from fedpilot.coordinator.server import start
    from fedpilot.coordinator.settings import CoordinatorSettings

    running = start(CoordinatorSettings(data_dir=tmp_path, grpc_port=0, http_port=0))
    try:
        url = f"http://127.0.0.1:{running.http_port}"
        before = _resent_calls(url)
        metrics.RESENT_CALLS.labels(method="DownloadAdapter").inc(3)
        metrics.RESENT_CALLS.labels(method="Register").inc()
        after = _resent_calls(url)
        assert after["DownloadAdapter"] == before.get("DownloadAdapter", 0) + 3
        assert after["Register"] == before.get("Register", 0) + 1
        assert _resent_calls("") == {}
    finally:
        running.stop(grace=0.2)


def test_cpu_sampler_charges_a_round_to_whoever_used_the_cpu() -> None:
    import os
    import subprocess
    import sys
    import time

    from fedpilot.bench.load import CpuSampler, round_cpu

    # This process stands in for the coordinator, a busy child for the fleet.
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler = CpuSampler(os.getpid(), [child.pid], period_s=0.02).start()
        time.sleep(0.1)  # a sample before the window
        start = time.time()
        spin = time.process_time() + 0.3
        while time.process_time() < spin:
            pass
        end = time.time()
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    used = sampler.between(start, end)
    assert 0.25 <= used["coordinator"] <= 0.6  # the window and a period each side
    assert used["fleet"] >= 0.1 and used["machine"] >= used["coordinator"]
    summary = round_cpu(sampler, [(start, end), (end + 60, end + 61)])  # one window empty
    assert summary["coordinator_cpu_s"] == pytest.approx(used["coordinator"], abs=0.01)
    assert 0 < summary["machine_busy_share"] <= 1.05
    assert round_cpu(sampler, [(end + 60, end + 61)]) == {}


def test_bench_statements_reads_the_same_task_every_way_and_leaves_no_schema(
    pg_url: str,
) -> None:
    result = CliRunner().invoke(
        app, ["bench", "statements", "--reads", "20", "--postgres-url", pg_url]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["path"] for r in rows] == [
        "sqlalchemy",
        "psycopg",
        "sqlalchemy_asyncio",
        "psycopg_asyncio",
    ]
    # Each path found the seeded worker's task: the compiled SQL is the store's statement.
    assert all(r["same_task_as_every_path"] for r in rows)
    assert all(r["cpu_us_per_read"] > 0 and r["wall_us_per_read"] > 0 for r in rows)
    assert next(r for r in rows if r["path"] == "psycopg")["cpu_ratio_to_psycopg"] == 1.0
    with create_engine(pg_url).connect() as conn:
        left = conn.execute(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_load_%'")
        ).all()
    assert left == []
