"""The distribution: one import name, every data file in the wheel and in an editable install.

The dashboard, the database migrations and the bundled dataset are read at run
time through the package, so a wheel or an editable install that misses one
fails only in production. Both are built here from a copy of the working tree,
and setuptools must have nothing to warn about.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.checkout import ROOT, clean_env, copy_working_tree, editable_env

DATA_FOLDERS = {
    # folder in the repository -> package it belongs to
    "dashboard/static": "fedpilot.dashboard.static",
    "dashboard/templates": "fedpilot.dashboard.templates",
    "coordinator/db/migrations": "fedpilot.coordinator.db.migrations",
    "coordinator/db/migrations/versions": "fedpilot.coordinator.db.migrations.versions",
    "fedpilot/datasets/banking77": "fedpilot.datasets.banking77",
    "fedpilot/datasets/spamassassin": "fedpilot.datasets.spamassassin",
    "fedpilot/datasets/sotu": "fedpilot.datasets.sotu",
}
WARNINGS = ("Warning:", "would be ignored", "is absent from the `packages`", "deprecated")


def _resources() -> dict[str, list[str]]:
    """package -> file names it must carry (from the folders as they are in the repository)."""
    return {
        package: sorted(
            p.name
            for p in (ROOT / folder).iterdir()
            if p.is_file() and p.suffix != ".pyc" and not p.name.startswith(".")
        )
        for folder, package in DATA_FOLDERS.items()
    }


def test_the_repository_folders_hold_what_the_services_read() -> None:
    files = _resources()
    assert {"job.html", "jobs.html", "layout.html"} <= set(files["fedpilot.dashboard.templates"])
    assert {"job.js", "common.js", "dashboard.css"} <= set(files["fedpilot.dashboard.static"])
    assert {"env.py", "script.py.mako"} <= set(files["fedpilot.coordinator.db.migrations"])
    assert any(
        n.endswith(".py") and n[0].isdigit()
        for n in files[DATA_FOLDERS["coordinator/db/migrations/versions"]]
    )
    assert {"train.csv", "test.csv", "LICENSE", "README.md"} <= set(
        files["fedpilot.datasets.banking77"]
    )
    assert {"data.csv", "LICENSE", "README.md"} <= set(files["fedpilot.datasets.spamassassin"])
    assert {"data.csv", "LICENSE", "README.md"} <= set(files["fedpilot.datasets.sotu"])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_working_tree(tmp_path_factory.mktemp("src"))


def test_the_wheel_builds_without_warnings_and_carries_every_data_file(
    source: Path, tmp_path: Path
) -> None:
    # Execute: what `pip wheel .` does, with the environment's setuptools (no download).
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-4000:]
    backend = [line for line in output.splitlines() if "Location '" not in line]
    assert not [line for line in backend if any(w in line for w in WARNINGS)], output[-4000:]

    # Assert: one import name, and every file the services read at run time.
    (wheel,) = tmp_path.glob("fedpilot-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedpilot"}
    for package, files in _resources().items():
        folder = package.replace(".", "/")
        missing = [f for f in files if f"{folder}/{f}" not in names]
        assert not missing, f"{package} lacks {missing} in the wheel"
    # Every module of the mapped folders (a package missing from pyproject.toml's list
    # leaves the wheel silently).
    mapped = {
        "fedpilot": "fedpilot",
        "coordinator": "fedpilot/coordinator",
        "worker": "fedpilot/worker",
        "dashboard": "fedpilot/dashboard",
    }
    for folder, inside in mapped.items():
        modules = [p.relative_to(source / folder) for p in (source / folder).rglob("*.py")]
        missing = [str(m) for m in modules if f"{inside}/{m.as_posix()}" not in names]
        assert not missing, f"{folder}/: {missing} not in the wheel (list the package)"


def test_an_editable_install_resolves_the_same_files_in_the_checkout(
    source: Path, tmp_path: Path
) -> None:
    # Prepare: an editable install of the copy, in an environment of its own.
    python, build_output = editable_env(source, tmp_path)
    # setuptools says one thing on every editable install of a mapped layout, as
    # information (the Makefile filters it by message); nothing else.
    noted = [
        line
        for line in build_output.splitlines()
        if any(w in line for w in WARNINGS) and "Editable installation" not in line
    ]
    assert not noted, build_output[-4000:]

    # Execute: resolve each data file through importlib.resources, from elsewhere.
    probe = (
        "import importlib.resources as r, json, sys; "
        "wanted = json.loads(sys.argv[1]); "
        "print(json.dumps({p: [str(r.files(p).joinpath(f)) for f in fs if "
        "r.files(p).joinpath(f).is_file()] for p, fs in wanted.items()}))"
    )
    wanted = _resources()
    found = subprocess.run(
        [str(python), "-c", probe, json.dumps(wanted)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert found.returncode == 0, found.stderr[-3000:]
    resolved = json.loads(found.stdout)

    # Assert: every file found, each one the checkout's own (edits show without reinstall).
    for package, files in wanted.items():
        assert len(resolved[package]) == len(files), f"{package}: {resolved[package]} vs {files}"
        assert all(Path(p).is_relative_to(source) for p in resolved[package]), resolved[package]
    migrations = subprocess.run(
        [
            str(python),
            "-c",
            "from fedpilot.coordinator.db.migrate import MIGRATIONS; print(MIGRATIONS)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    )
    assert Path(migrations.stdout.strip()) == source / "coordinator" / "db" / "migrations"
