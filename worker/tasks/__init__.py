"""What differs between the tasks a job can train, behind one small interface.

A :class:`Task` reads a worker's local data, maps it to the job's dataset,
builds batches of the shape the memory profile was measured at, and makes the
random batch the profile measures. Everything else (LoRA, module naming,
profiling, IG scores, training, aggregation) is task-agnostic and shared.

=========================  ===============================  ==============================
task                       data                             batch
=========================  ===============================  ==============================
sequence-classification    CSV / JSON Lines / saved dataset ``input_ids``, ``labels`` (B)
causal-lm                  instruction or chat JSON Lines   ``input_ids``, ``labels`` (B, T)
image-classification       image folder / saved dataset     ``pixel_values``, ``labels`` (B)
=========================  ===============================  ==============================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpilot.worker.data import Batch, DataError, make_batches, read_examples, to_dataset
from fedpilot.worker.model import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    SEQUENCE_CLASSIFICATION,
    TASKS,
    ModelSpec,
    hf_config,
    load_image_processor,
    load_tokenizer,
    task_of,
)
from fedpilot.worker.tasks import causal_lm, image

__all__ = ["TASKS", "LocalData", "Task", "get_task", "read_local_data", "task_dummy_batch"]


@dataclass(frozen=True)
class LocalData:
    """A worker's data as read, before the job's classes are applied."""

    task: str
    """The task this data can train (decided by its format)."""
    raw: Any
    path: str

    def __len__(self) -> int:
        return len(self.raw)


def _first_jsonl_object(path: Path) -> object:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the text reader reports the problem with its line number
    return None


def data_task(path: str | Path) -> str:
    """Which task the data at ``path`` is for, from its format alone."""
    p = Path(path)
    if p.is_dir():
        return IMAGE_CLASSIFICATION if image.is_image_source(p) else SEQUENCE_CLASSIFICATION
    if p.suffix.lower() in (".jsonl", ".ndjson") and causal_lm.is_instruction_record(
        _first_jsonl_object(p)
    ):
        return CAUSAL_LM
    return SEQUENCE_CLASSIFICATION


def read_local_data(
    path: str | Path, *, text_column: str | None = None, label_column: str | None = None
) -> LocalData:
    """Read a worker's data in whichever format it is; :class:`DataError` on a problem."""
    task = data_task(path)
    raw: Any
    if task == CAUSAL_LM:
        raw = causal_lm.read_conversations(path)
    elif task == IMAGE_CLASSIFICATION:
        raw = image.read_images(path)
    else:
        raw = read_examples(path, text_column=text_column, label_column=label_column)
    return LocalData(task, raw, str(path))


class Task:
    """Sequence classification; subclasses override what differs."""

    name = SEQUENCE_CLASSIFICATION

    def dataset(
        self,
        data: LocalData,
        *,
        label_names: Sequence[str] | None,
        num_labels: int | None,
        skip_unknown_labels: bool = False,
    ) -> Any:
        """The job's dataset: labels mapped to its class ids (classification)."""
        if data.task != self.name:
            raise DataError(
                f"{data.path} holds {data.task} data (by its format) but the job trains "
                f"{self.name}; see docs/configuration.md for each task's data format"
            )
        return self._dataset(data.raw, label_names, num_labels, skip_unknown_labels)

    def _dataset(
        self, raw: Any, label_names: Sequence[str] | None, num_labels: int | None, skip: bool
    ) -> Any:
        return to_dataset(
            raw, label_names=label_names, num_labels=num_labels, skip_unknown_labels=skip
        )

    def batches(self, data: Any, spec: ModelSpec) -> list[Batch]:
        return make_batches(
            data, load_tokenizer(spec), batch_size=spec.batch_size, max_seq_len=spec.max_seq_len
        )

    def dummy_batch(self, config: Any, batch_size: int, seq_len: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        low = min(1000, config.vocab_size - 1)  # skip special tokens at the start of the vocab
        ids = torch.randint(low, config.vocab_size, (batch_size, seq_len), generator=g)
        labels = torch.randint(0, config.num_labels, (batch_size,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class CausalLmTask(Task):
    name = CAUSAL_LM

    def _dataset(
        self, raw: Any, label_names: Sequence[str] | None, num_labels: int | None, skip: bool
    ) -> Any:
        return raw  # no classes: the responses are the targets

    def batches(self, data: Any, spec: ModelSpec) -> list[Batch]:
        return causal_lm.make_batches(
            data, load_tokenizer(spec), batch_size=spec.batch_size, max_seq_len=spec.max_seq_len
        )

    def dummy_batch(self, config: Any, batch_size: int, seq_len: int, seed: int) -> Batch:
        return causal_lm.dummy_batch(config.vocab_size, batch_size, seq_len, seed=seed)


class ImageTask(Task):
    name = IMAGE_CLASSIFICATION

    def _dataset(
        self, raw: Any, label_names: Sequence[str] | None, num_labels: int | None, skip: bool
    ) -> Any:
        return image.to_image_dataset(
            raw, label_names=label_names, num_labels=num_labels, skip_unknown_labels=skip
        )

    def batches(self, data: Any, spec: ModelSpec) -> list[Batch]:
        return image.make_batches(data, load_image_processor(spec), batch_size=spec.batch_size)

    def dummy_batch(self, config: Any, batch_size: int, seq_len: int, seed: int) -> Batch:
        return image.dummy_batch(config, batch_size, seed=seed)


_TASKS: dict[str, Task] = {t.name: t for t in (Task(), CausalLmTask(), ImageTask())}


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; one of {list(TASKS)}")
    return _TASKS[name]


def task_dummy_batch(model: nn.Module, batch_size: int, seq_len: int, *, seed: int = 0) -> Batch:
    """The profile's random batch for the task ``model`` was built for, on its device."""
    batch = get_task(task_of(model)).dummy_batch(hf_config(model), batch_size, seq_len, seed)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}
