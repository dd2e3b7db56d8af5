"""Datasets shipped with fedpilot, so that the demo and benches need nothing beside the clone.

BANKING77 (CC BY 4.0, see ``banking77/README.md``) is bundled as package data; the
environment variable ``FEDPILOT_BANKING77`` points at another copy instead.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_BANKING77 = Path(__file__).resolve().parent / "banking77"
"""The copy inside the installed package (``train.csv``, ``test.csv``, ``categories.json``)."""


def banking77_dir() -> Path:
    """The BANKING77 folder to use: ``$FEDPILOT_BANKING77`` when set, else the bundled copy."""
    override = os.environ.get("FEDPILOT_BANKING77")
    return Path(override) if override else BUNDLED_BANKING77


__all__ = ["BUNDLED_BANKING77", "banking77_dir"]
