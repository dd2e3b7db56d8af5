"""The algorithm benches run and report what they claim: same-run baselines, errors."""

from __future__ import annotations

import pytest


def test_exact_bench_compares_both_merges_with_the_exact_truncation(monkeypatch) -> None:
    from fedpilot.bench import exact

    monkeypatch.setitem(exact.SHAPES, "tiny", ([(48, 40), (40, 48)], 4, 3))
    (row,) = exact.run(("tiny",))
    assert row["modules"] == 2 and row["clients"] == 3
    # 3 clients x rank 4 + 4 = 16 stacked columns: (48 + 40) x 16 < 48 x 40, so the
    # stacked way ran; it is the exact truncation, the dense way a randomized one.
    assert row["stacked_error_to_exact"] < 1e-5
    assert row["dense_error_to_exact"] < 1e-2
    assert row["stacked_s"] > 0 and row["dense_s"] > 0


def test_aggregate_bench_reports_fold_and_whole_round_against_memcpy() -> None:
    from fedpilot.bench import aggregate

    (row,) = aggregate.run(clients=(3,), merges=("factors",))
    assert row["clients"] == 3 and row["memcpy_gb_per_s"] > 0
    assert row["seconds"] == pytest.approx(row["fold_seconds"] + row["finish_seconds"], rel=0.5)
    assert 0 < row["ratio_to_memcpy"] <= row["fold_ratio_to_memcpy"]
