"""This repository somewhere else, run with the test environment's packages.

A fresh clone (or a copy of the working tree) gets its own editable install of
``fedpilot`` in a throwaway virtual environment; every other package comes from
the interpreter running the tests, so nothing is downloaded or reinstalled.
The install is setuptools' own PEP 660 editable wheel of the checkout, unpacked
into the environment as pip would, so the checkout's packaging is what maps
``fedpilot.coordinator`` to ``coordinator/`` and so on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = ROOT) -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        raise AssertionError(f"{ROOT} is not a git checkout (or git is missing)")
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def clone(target: Path) -> Path:
    """``git clone`` of the committed HEAD, as a newcomer gets it."""
    _git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(target))
    return target


def copy_working_tree(target: Path) -> Path:
    """The files git would commit now (tracked or new, not ignored), copied to ``target``."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point a child at this checkout."""
    drop = {"PYTHONPATH", "FEDPILOT_BANKING77", "VIRTUAL_ENV", "PYTHONHOME"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def editable_env(checkout: Path, work: Path) -> tuple[Path, str]:
    """A virtual environment in ``work`` whose ``fedpilot`` is ``checkout``, editable.

    Returns its interpreter and the output of the editable build (for warning checks)."""
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (site,) = (venv / "lib").glob("python3*/site-packages")
    # Our packages, after the environment's own (a .pth line adds a path, and .pth files
    # in that path are not read: this checkout's own editable finder stays out).
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zz-test-packages.pth").write_text("\n".join(ours) + "\n")
    wheels = work / "wheels"
    build = subprocess.run(
        [
            str(python),
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_editable(sys.argv[1]))",
            str(wheels),
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return python, build.stdout + build.stderr
