"""`fedpilot simulate` on a job spec: progress, results files, a model that learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedpilot.cluster import write_csv
from fedpilot.worker.data import synthetic_dataset

LABELS = ["class0", "class1", "class2"]


def _csv(path: Path, n: int, seed: int) -> Path:
    data = synthetic_dataset(n, len(LABELS), seed=seed)
    return write_csv(path, data.texts, [LABELS[y] for y in data.labels])


def test_simulate_runs_a_job_spec_on_virtual_clients(tmp_path: Path, tiny_dir: Path) -> None:
    # Prepare: the spec a user would POST, with a held-out set
    spec = {
        "name": "sim-job",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": 3,
        "min_workers": 3,
        "local_steps": 8,
        "batch_size": 8,
        "max_seq_len": 16,
        "learning_rate": 0.03,
        "lora": {"rank": 4, "alpha": 8},
        "ig_probe_batches": 1,
        "eval_dataset": str(_csv(tmp_path / "eval.csv", 30, seed=9)),
    }
    job = tmp_path / "job.json"
    job.write_text(json.dumps(spec))
    out = tmp_path / "out"

    # Execute
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpilot.cli",
            "simulate",
            str(job),
            "--data",
            str(_csv(tmp_path / "train.csv", 120, seed=1)),
            "--clients",
            "3",
            "--setting",
            "dirichlet-0.5",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["method"] == "sim-job" and row["state"] == "done"
    assert len(row["accuracy"]) == 3 and row["violations"] == 0
    assert all(0 <= a <= 1 for a in row["accuracy"])
    before, after = row["train_loss"][0]
    assert after < before  # local training lowered the clients' loss
    assert row["workers_per_round"] == 3
    assert len(list((out / "data").glob("client*.csv"))) == 3
    report = json.loads((out / "results.json").read_text())
    assert report["results"][0]["accuracy"] == row["accuracy"]
    assert "| sim-job |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "round 3" in result.stderr  # the progress bar


def test_simulate_names_a_bad_spec_field(tmp_path: Path, tiny_dir: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(tiny_dir), "rounds": 0}))
    result = subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", "simulate", str(job), "--data", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "rounds" in result.stderr
