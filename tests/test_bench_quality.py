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

SIM_METHODS = (
    "fedpilot",
    "fresh-ig",
    "paper",
    "fedra",
    "hetlora",
    "flexlora",
    "uniform",
    "fedavg",
    "unconstrained",
)


def _dataset(folder: Path) -> Path:
    for name, n, seed in (("train.csv", 240, 1), ("test.csv", 60, 2)):
        data = synthetic_dataset(n, TINY_LABELS, seed=seed)
        write_csv(folder / name, data.texts, [f"class{y}" for y in data.labels])
    return folder


def _bench(tmp_path: Path, tiny_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
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
            str(_dataset(tmp_path / "data")),
            "--per-class",
            "40",
            "--eval-per-class",
            "15",
            "--batch-size",
            "4",
            "--max-seq-len",
            "16",
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_quick_sim_bench_runs_every_method_and_seed_and_reports_intervals(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Execute: one method of each kind and every rank baseline, 2 seeds, on the simulator
    result = _bench(
        tmp_path,
        tiny_dir,
        "--seeds",
        "2",
        "--setting",
        "pathological-2",
        *[x for m in SIM_METHODS for x in ("--method", m)],
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["seed"], r["method"]) for r in rows] == [
        (k, m) for k in (0, 1) for m in METHOD_NAMES if m in SIM_METHODS
    ]
    assert {r["setting"] for r in rows} == {"pathological-2"}
    for r in rows:
        assert r["engine"] == "sim" and r["state"] == "done", r
        assert r["violations"] == 0, r
        assert len(r["accuracy"]) == 2
        assert r["assigned_tasks"] > 0
    by = {(r["seed"], r["method"]): r for r in rows}
    assert by[(0, "uniform")]["mean_modules"] < by[(0, "unconstrained")]["mean_modules"]
    out = tmp_path / "out"
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(rows)
    report = json.loads((out / "results.json").read_text())
    summary = {s["method"]: s for s in report["summary"]}
    assert summary["fedavg"]["final"]["n"] == 2
    assert summary["fedavg"]["vs_reference"]["ci95"] is not None
    assert summary["fedpilot"]["vs_reference"] is None
    table = (out / "results.md").read_text()
    for name in SIM_METHODS:
        assert f"| {name} |" in table
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_cluster_bench_runs_the_cluster_methods_without_violations(
    tmp_path: Path, tiny_dir: Path
) -> None:
    # Execute: the real processes, on the methods the cluster runs
    methods = ["fedpilot", "paper", "fedra", "exclusive", "unconstrained"]
    result = _bench(
        tmp_path, tiny_dir, "--engine", "cluster", *[x for m in methods for x in ("--method", m)]
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == methods
    for r in rows:
        assert r["engine"] == "cluster" and r["state"] == "done", r
        assert r["violations"] == 0, r
        assert len(r["accuracy"]) == 2
        assert r["bytes_moved"] > 0 and r["assigned_tasks"] > 0
    assert "bench quality" in result.stderr  # the rich table


def test_sim_only_methods_are_refused_on_the_cluster(tmp_path: Path, tiny_dir: Path) -> None:
    result = _bench(tmp_path, tiny_dir, "--engine", "cluster", "--method", "hetlora")
    assert result.returncode != 0
    assert "simulator only" in result.stdout + result.stderr


def test_the_report_says_when_the_bound_was_still_rising_or_beaten() -> None:
    from fedpilot.bench.quality import ordered_summary
    from fedpilot.bench.stats import above_bound, still_rising

    def run(method: str, seed: int, curve: list[float]) -> dict:
        return {
            "setting": "s",
            "method": method,
            "kind": "bound" if method.startswith("unconstrained") else "paper",
            "seed": seed,
            "accuracy": curve,
            "final_accuracy": curve[-1],
            "best_accuracy": max(curve),
            "violations": 0,
            "state": "done",
            "wall_s": 1.0,
        }

    rising = [run("unconstrained", k, [0.1, 0.2, 0.3, 0.4, 0.5]) for k in (0, 1)]
    flat = [run("unconstrained", k, [0.1, 0.5, 0.5, 0.51, 0.5]) for k in (0, 1)]
    assert still_rising(rising, "s") == pytest.approx(0.3)
    assert still_rising(flat, "s") is None
    beaten = flat + [run("fedpilot", k, [0.2, 0.6]) for k in (0, 1)]
    assert above_bound(ordered_summary(beaten), "s") == ["fedpilot"]
    assert above_bound(ordered_summary(rising + beaten[2:]), "s") == ["fedpilot"]
    assert above_bound(ordered_summary(flat), "s") == []
    # An earlier configuration's bound is another bound, not a method to rank against it
    older = [run("unconstrained/no-momentum", k, [0.2, 0.7]) for k in (0, 1)]
    assert above_bound(ordered_summary(flat + older), "s") == []


def test_learning_means_clearly_above_chance_for_any_number_of_classes() -> None:
    from fedpilot.bench.quality import ordered_summary
    from fedpilot.bench.stats import learned, learned_threshold

    assert learned_threshold(1 / 20) == pytest.approx(0.1)  # twice chance
    assert learned_threshold(1 / 2) == pytest.approx(0.625)  # not 1.0, out of reach
    assert learned_threshold(1 / 3) == pytest.approx(0.5)

    def bound(seed: int, final: float) -> dict:
        return {
            "setting": "s",
            "method": "unconstrained",
            "kind": "bound",
            "seed": seed,
            "accuracy": [final],
            "final_accuracy": final,
            "best_accuracy": final,
            "violations": 0,
            "state": "done",
            "wall_s": 1.0,
        }

    assert learned(ordered_summary([bound(0, 0.92), bound(1, 0.93)]), "s", 0.5)
    assert not learned(ordered_summary([bound(0, 0.92), bound(1, 0.55)]), "s", 0.5)
