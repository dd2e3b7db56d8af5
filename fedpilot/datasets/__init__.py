"""Datasets shipped with fedpilot, so that the demo and benches need nothing beside the clone.

BANKING77 (CC BY 4.0, see ``banking77/README.md``) is bundled as package data; the
environment variable ``FEDPILOT_BANKING77`` points at another copy instead. A ham/spam
version of the SpamAssassin public corpus (PDDL 1.0 / CC0, see
``spamassassin/README.md``) is the second dataset of ``fedpilot bench quality``, never
used to choose defaults; sentences of the State of the Union addresses labelled by era
(PDDL 1.0 / CC0, see ``sotu/README.md``) are a third, held out in the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_BANKING77 = Path(__file__).resolve().parent / "banking77"
"""The copy inside the installed package (``train.csv``, ``test.csv``, ``categories.json``)."""

BUNDLED_SPAMASSASSIN = Path(__file__).resolve().parent / "spamassassin" / "data.csv"
"""One CSV, columns ``text`` and ``label`` (``ham`` or ``spam``)."""

BUNDLED_SOTU = Path(__file__).resolve().parent / "sotu" / "data.csv"
"""One CSV, columns ``text`` and ``label`` (a 40-year era, ``1790-1829`` to ``1990-2029``)."""


def banking77_dir() -> Path:
    """The BANKING77 folder to use: ``$FEDPILOT_BANKING77`` when set, else the bundled copy."""
    override = os.environ.get("FEDPILOT_BANKING77")
    return Path(override) if override else BUNDLED_BANKING77


__all__ = ["BUNDLED_BANKING77", "BUNDLED_SOTU", "BUNDLED_SPAMASSASSIN", "banking77_dir"]
