"""`python -m fedpilot.bench.hostile` runs and reports its baseline and attack cases."""

from fedpilot.bench.hostile import registration_under_silent_streams, spec_parsing_at_the_body_limit


def test_the_hostile_bench_reports_baseline_and_attack() -> None:
    rows = list(registration_under_silent_streams(silent_streams=40, threads=8, calls=3))
    assert [r["case"] for r in rows] == ["register, idle", "register, 40 silent upload streams"]
    assert all(r["n"] == 3 and r["median_ms"] > 0 for r in rows)
    assert rows[1]["refused_streams"] >= 1  # anonymous streams are refused, not held
    (parse,) = spec_parsing_at_the_body_limit(limit=64 * 1024)
    assert 60 * 1024 < parse["bytes"] <= 64 * 1024
