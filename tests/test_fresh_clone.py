"""The README's main command from a fresh clone with nothing beside it.

The clone sits alone in a temporary directory (no ``../shared``, no
``FEDPILOT_BANKING77``), gets an editable install of its own (the test
environment's other packages are reused, nothing is downloaded) and runs the
demo, shrunk: two workers, two rounds, a few examples.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.checkout import clean_env, clone, editable_env


@pytest.mark.slow
def test_demo_runs_from_a_fresh_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    # Prepare: the committed HEAD, alone in its folder.
    repo = clone(tmp_path / "fedpilot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedpilot"]
    python, _ = editable_env(repo, tmp_path / "env")
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import fedpilot.coordinator, fedpilot.datasets, fedpilot.worker as w; "
            "print(fedpilot.coordinator.__file__, fedpilot.datasets.banking77_dir(), w.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(repo) for p in where), where  # the clone's own code

    # Execute: the demo as the README runs it, with tiny settings.
    result = subprocess.run(
        [
            str(python),
            "-m",
            "fedpilot.cli",
            "demo",
            "--workers",
            "2",
            "--rounds",
            "2",
            "--classes",
            "3",
            "--per-class",
            "16",
            "--local-steps",
            "2",
            "--http-port",
            "0",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        env=clean_env(COLUMNS="400"),
        timeout=900,
        check=False,
    )

    # Assert: an accuracy line, the final table, an adapter directory inside the clone.
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert f"from {repo / 'fedpilot' / 'datasets' / 'banking77'}" in out.replace("\n", "")
    assert re.search(r"final accuracy 0\.\d{3} on 3 intents", out), out[-2000:]
    assert "Rounds" in out and "round 2: accuracy" in out
    adapter = repo / "data" / "demo" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    summary = json.loads((repo / "data" / "demo" / "summary.json").read_text())
    assert Path(summary["adapter"]) == adapter and len(summary["accuracy"]) == 2
