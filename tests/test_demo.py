"""The README's main command, shrunk: real MiniLM, real BANKING77, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from fedpilot.demo import DEFAULT_DATASET


@pytest.mark.slow
def test_demo_runs_a_federated_job_and_writes_a_loadable_adapter(tmp_path: Path) -> None:
    # Execute: the CLI as a user runs it, small enough for CI.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpilot.cli",
            "demo",
            "--workers",
            "3",
            "--rounds",
            "2",
            "--classes",
            "5",
            "--per-class",
            "40",
            "--local-steps",
            "6",
            "--out",
            str(tmp_path),
            "--dataset",
            str(DEFAULT_DATASET),
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["accuracy"]) == 2
    budgets = sorted(w["budget_bytes"] for w in summary["workers"])
    assert budgets[0] < budgets[-1]  # heterogeneous tiers
    trained = sorted(len(w["modules"]) for w in summary["workers"])
    assert trained[0] < trained[-1]
    for w in summary["workers"]:
        assert w["predicted_bytes"] <= w["budget_bytes"]
    assert "Rounds" in result.stdout and "final PEFT adapter" in result.stdout
    # Progress: the dashboard first, then a line per phase of every round.
    out = result.stdout
    dashboard = out.index("dashboard: http://127.0.0.1:")
    assert dashboard < out.index("memory model:") < out.index("round 1/2: waiting for workers")
    steps = [  # phases that last seconds at least (a poll a second sees them)
        "round 1/2: profiling, 0/3 workers profiled",
        "round 1/2: training, 0/3 updates in",
        "round 1: accuracy",
        "round 2/2: training",
        "round 2: accuracy",
        "round 2/2: done",
    ]
    where = [out.index(step) for step in steps]
    assert where == sorted(where), out

    from fedpilot.worker.model import ModelSpec, load_model

    base = load_model(ModelSpec(num_labels=5)).get_base_model()
    loaded = PeftModel.from_pretrained(base, summary["adapter"])
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_the_dataset_is_bundled_and_both_overrides_are_honoured(tmp_path: Path) -> None:
    from fedpilot.datasets import BUNDLED_BANKING77

    # Nothing set: the copy inside the package, which holds both splits.
    env = {k: v for k, v in os.environ.items() if k != "FEDPILOT_BANKING77"}
    probe = "from fedpilot.demo import DEFAULT_DATASET; print(DEFAULT_DATASET)"
    default = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert Path(default.stdout.strip()) == BUNDLED_BANKING77
    assert (BUNDLED_BANKING77 / "train.csv").stat().st_size > 500_000
    assert (BUNDLED_BANKING77 / "test.csv").is_file()
    assert "shared" not in BUNDLED_BANKING77.parts

    # FEDPILOT_BANKING77 and --dataset each name another folder; a folder without the
    # files stops the demo before it starts anything, naming the folder.
    elsewhere = tmp_path / "elsewhere"
    result = _demo("--out", str(tmp_path / "a"), env={**env, "FEDPILOT_BANKING77": str(elsewhere)})
    assert result.returncode == 1
    assert f"no train.csv under {elsewhere}" in result.stderr
    other = tmp_path / "other"
    result = _demo("--dataset", str(other), "--out", str(tmp_path / "b"), env=env)
    assert result.returncode == 1 and f"no train.csv under {other}" in result.stderr
    assert not (tmp_path / "b" / "cluster").exists()  # no process was started
