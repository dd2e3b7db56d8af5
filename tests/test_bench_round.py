"""`fedpilot bench round` on a handful of simulated workers: fields present and sane."""

from __future__ import annotations

from fedpilot.bench.round import RoundConfig, run

PARTS = ("assign_s", "aggregate_s", "db_s", "transfer_s", "idle_s")


def test_round_bench_reports_a_consistent_breakdown() -> None:
    # Execute: 4 simulated workers over the real protocol, a small adapter, short polls
    (row,) = run((4,), RoundConfig(rounds=3, layers=2, poll_wait_ms=500, timeout_s=120))

    # Assert
    assert row["bench"] == "round" and row["workers"] == 4
    assert row["rounds_measured"] == 2
    assert row["updates_per_round"] == [4, 4, 4]
    for key in ("round_s", "overhead_s", *PARTS, "service_db_s"):
        assert row[key] >= 0, key
    assert row["round_s"] > 0 and row["overhead_s"] <= row["round_s"]
    for key in ("overhead_share", *(p.removesuffix("_s") + "_share" for p in PARTS)):
        assert 0 <= row[key] <= 1, key
    # The parts add up to the round (rounding aside).
    assert abs(sum(row[p] for p in PARTS) - row["round_s"]) < 0.01 + 0.01 * row["round_s"]
    assert row["adapter_bytes"] > 0 and 0 < row["mean_update_bytes"] <= row["adapter_bytes"]
