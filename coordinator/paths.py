"""Files a job names, confined to the coordinator's data roots.

A job spec comes from an API user; the coordinator must never read (or say
whether it could read) a file outside the folders its operator configured.
Paths are resolved first (symlinks, ``..``), then checked, so a link inside a
root that points outside it is refused like the outside path itself.
"""

from __future__ import annotations

from pathlib import Path

from fedpilot.coordinator.settings import CoordinatorSettings


def data_roots(settings: CoordinatorSettings) -> list[Path]:
    """The configured roots, or ``data_dir`` and the bundled datasets, resolved."""
    roots = list(settings.data_roots)
    if not roots:
        from fedpilot.datasets import BUNDLED_BANKING77

        roots = [settings.data_dir, BUNDLED_BANKING77.parent]
    return [Path(r).expanduser().resolve() for r in roots]


def confined(path: str | Path, roots: list[Path]) -> Path | None:
    """``path`` resolved, if it lies inside one of ``roots``; otherwise None.

    Relative paths are taken relative to the first root (never the working
    directory). Nothing here reveals whether the file exists.
    """
    text = str(path)
    if not text or "\x00" in text or not roots:
        return None
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = roots[0] / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return resolved if any(resolved.is_relative_to(root) for root in roots) else None


def outside_message(field: str, roots: list[Path]) -> str:
    """The refusal of a path outside the roots: the same text whatever the file is."""
    listed = ", ".join(str(r) for r in roots)
    return (
        f"{field} must be a path under the coordinator's data roots ({listed}; FEDPILOT_DATA_ROOTS)"
    )
