"""`fedpilot bench quality --quick` end to end on a tiny random BERT and synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpilot.bench.quality import METHOD_NAMES
from fedpilot.cluster import write_csv
from fedpilot.worker.data import synthetic_dataset
from tests.models import TINY_LABELS


def _dataset(folder: Path) -> Path:
    for name, n, seed in (("train.csv", 240, 1), ("test.csv", 60, 2)):
        data = synthetic_dataset(n, TINY_LABELS, seed=seed)
        write_csv(folder / name, data.texts, [f"class{y}" for y in data.labels])
    return folder


@pytest.mark.slow
def test_quick_quality_bench_compares_every_method_without_violations(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Prepare
    out = tmp_path / "out"
    data = _dataset(tmp_path / "data")

    # Execute: the CLI as a user runs it, shrunk to 3 workers (one per memory tier)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpilot.cli",
            "bench",
            "quality",
            "--quick",
            "--workers",
            "3",
            "--rounds",
            "2",
            "--model",
            str(tiny_dir),
            "--dataset",
            str(data),
            "--per-class",
            "40",
            "--eval-per-class",
            "15",
            "--batch-size",
            "4",
            "--max-seq-len",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == list(METHOD_NAMES)
    for r in rows:
        assert r["bench"] == "quality" and r["state"] == "done", r
        assert r["violations"] == 0, r
        assert len(r["accuracy"]) == 2
        assert r["bytes_moved"] > 0 and r["assigned_tasks"] > 0
    by_name = {r["method"]: r for r in rows}
    assert by_name["uniform"]["mean_modules"] < by_name["unconstrained"]["mean_modules"]
    report = json.loads((out / "results.json").read_text())
    assert len(report["results"]) == len(METHOD_NAMES)
    table = (out / "results.md").read_text()
    for name in METHOD_NAMES:
        assert f"| {name} |" in table
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "bench quality" in result.stderr  # the rich table
