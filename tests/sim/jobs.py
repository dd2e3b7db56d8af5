"""A tiny job and synthetic clients for simulator tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpilot.cluster import write_csv
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.sim import VirtualClient
from fedpilot.worker.data import synthetic_dataset

LABELS = ["class0", "class1", "class2"]


def tiny_spec(tiny_dir: Path, **changes: Any) -> JobSpec:
    """2 rounds of 2 local steps on the tiny model, LoRA rank 4; ``changes`` override."""
    return JobSpec.model_validate(
        {
            "name": "sim",
            "model": str(tiny_dir),
            "labels": LABELS,
            "rounds": 2,
            "min_workers": 2,
            "local_steps": 2,
            "batch_size": 4,
            "max_seq_len": 16,
            "lora": {"rank": 4, "alpha": 8},
            **changes,
        }
    )


def synthetic_clients(folder: Path, budgets: Sequence[int], examples: int) -> list[VirtualClient]:
    """Clients ``c0``, ``c1``, ... with ``examples`` synthetic rows each (seeded by index)."""
    clients = []
    for i, budget in enumerate(budgets):
        data = synthetic_dataset(examples, len(LABELS), seed=i)
        path = write_csv(folder / f"c{i}.csv", data.texts, [LABELS[y] for y in data.labels])
        clients.append(VirtualClient(f"c{i}", path, budget))
    return clients
