"""`fedpilot submit` with YAML and JSON specs; field errors reach the user."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedpilot.cli import app
from fedpilot.coordinator.db.models import Job
from tests.api.conftest import TOKEN, Api


def test_submit_yaml_and_json_and_a_bad_spec(api: Api, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"FEDPILOT_API_URL": api.url, "FEDPILOT_API_TOKEN": TOKEN}
    yaml_spec = tmp_path / "job.yaml"
    yaml_spec.write_text("name: from-yaml\nrounds: 2\nlabels: [a, b]\nlora:\n  rank: 4\n")
    result = runner.invoke(app, ["submit", str(yaml_spec)], env=env)
    assert result.exit_code == 0, result.output
    job = api.coordinator.store.job(result.output.strip())
    assert job is not None and job.spec["lora"]["rank"] == 4 and job.spec["num_labels"] == 2

    json_spec = tmp_path / "job.json"
    json_spec.write_text('{"name": "from-json", "rounds": 1}')
    assert runner.invoke(app, ["submit", str(json_spec)], env=env).exit_code == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nrounds: -3\nlora: {rank: 0}\n")
    result = runner.invoke(app, ["submit", str(bad)], env=env)
    assert result.exit_code == 2
    assert "rounds:" in result.output and "lora.rank:" in result.output
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    result = runner.invoke(app, ["submit", str(not_a_mapping)], env=env)
    assert result.exit_code == 2 and "mapping" in result.output
    assert api.coordinator.store.count(Job) == 2


def test_submit_to_an_unreachable_coordinator_says_so(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\n")
    result = CliRunner().invoke(app, ["submit", str(spec), "--api", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach" in result.output
