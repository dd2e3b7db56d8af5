"""The README's main command, shrunk: real MiniLM, real BANKING77, real processes."""

from __future__ import annotations

import json
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
    assert "dashboard: http://127.0.0.1:" in result.stdout

    from fedpilot.worker.model import ModelSpec, load_model

    base = load_model(ModelSpec(num_labels=5)).get_base_model()
    loaded = PeftModel.from_pretrained(base, summary["adapter"])
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
