"""Typer-free entry points for worker commands (the CLI wires options onto these)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO


def profile_main(
    model: str | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    rank: int = 8,
    *,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = ("query", "value"),
    num_labels: int = 2,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    output: str | Path | None = None,
    stream: TextIO | None = None,
) -> int:
    """``fedpilot profile``: measure the memory model and print it as ``fedpilot plan`` JSON.

    ``target_modules`` may be a comma-separated string. With ``output`` the
    JSON is also written to that file. Returns the exit code.
    """
    from fedpilot.worker.profiling import run_profile_command

    targets = (
        [t.strip() for t in target_modules.split(",") if t.strip()]
        if isinstance(target_modules, str)
        else list(target_modules)
    )
    result = run_profile_command(
        model,
        batch_size,
        seq_len,
        rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=targets,
        num_labels=num_labels,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    text = json.dumps(result, indent=2)
    if output is not None:
        Path(output).write_text(text + "\n")
    print(text, file=stream or sys.stdout)
    return 0
