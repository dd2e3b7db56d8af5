"""Local text-classification data: CSV loading, class selection, tokenized batches.

Label ids come from the *sorted* label names of the file (or names given by
the job), so every worker holding a shard of the same data set maps names to
the same ids without talking to anyone.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TextDataset:
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")
        n = len(self.label_names)
        if any(not 0 <= y < n for y in self.labels):
            raise ValueError(f"labels must be in [0, {n})")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        idx = list(indices)
        return TextDataset(
            tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx), self.label_names
        )


def _pick_column(header: Sequence[str], wanted: str | None, candidates: Sequence[str]) -> str:
    if wanted is not None:
        if wanted not in header:
            raise ValueError(f"column {wanted!r} not in CSV header {list(header)}")
        return wanted
    for c in candidates:
        if c in header:
            return c
    raise ValueError(f"none of the columns {list(candidates)} in CSV header {list(header)}")


def load_csv(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Read a CSV with a text column and a label-name column (BANKING77: ``text``, ``category``).

    ``label_names`` fixes the id of each name; rows whose label is not among
    them are dropped. By default the sorted names found in the file are used.
    """
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        tcol = _pick_column(header, text_column, ("text", "sentence", "content"))
        lcol = _pick_column(header, label_column, ("label", "category", "intent", "class"))
        rows = [(r[tcol], r[lcol]) for r in reader]
    names = tuple(label_names) if label_names is not None else tuple(sorted({y for _, y in rows}))
    ids = {name: i for i, name in enumerate(names)}
    kept = [(t, ids[y]) for t, y in rows if y in ids]
    return TextDataset(tuple(t for t, _ in kept), tuple(y for _, y in kept), names)


def select(
    data: TextDataset,
    *,
    classes: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> TextDataset:
    """Keep the first ``classes`` label names (ids renumbered from 0) and at most
    ``per_class`` random examples of each, in a seeded order."""
    names = data.label_names[:classes] if classes is not None else data.label_names
    by_label: dict[int, list[int]] = {i: [] for i in range(len(names))}
    for i, y in enumerate(data.labels):
        if y < len(names):
            by_label[y].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for idx in by_label.values():
        rng.shuffle(idx)
        chosen.extend(idx[:per_class] if per_class is not None else idx)
    rng.shuffle(chosen)
    return TextDataset(
        tuple(data.texts[i] for i in chosen), tuple(data.labels[i] for i in chosen), tuple(names)
    )


def make_batches(
    data: TextDataset,
    tokenizer: Any,
    *,
    batch_size: int,
    max_seq_len: int,
    pad_to_max: bool = True,
) -> list[Batch]:
    """Tokenize into batches with ``labels``.

    ``pad_to_max`` pads every batch to ``max_seq_len``, the shape the memory
    profile was measured at, so a real step never exceeds the prediction.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batches: list[Batch] = []
    for start in range(0, len(data), batch_size):
        texts = list(data.texts[start : start + batch_size])
        enc = tokenizer(
            texts,
            padding="max_length" if pad_to_max else "longest",
            truncation=True,
            max_length=max_seq_len,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        batch["labels"] = torch.tensor(data.labels[start : start + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


def synthetic_words(num_labels: int, noise_words: int = 40) -> list[str]:
    """The words :func:`synthetic_dataset` uses: one cue word per class, then noise."""
    return [f"cue{k}" for k in range(num_labels)] + [f"noise{k}" for k in range(noise_words)]


def synthetic_dataset(
    num_examples: int,
    num_labels: int,
    *,
    words_per_text: int = 8,
    noise_words: int = 40,
    seed: int = 0,
) -> TextDataset:
    """Random noise words plus one class cue word per text: learnable in a few steps."""
    rng = random.Random(seed)
    words = synthetic_words(num_labels, noise_words)
    noise = words[num_labels:]
    texts, labels = [], []
    for _ in range(num_examples):
        y = rng.randrange(num_labels)
        tokens = [rng.choice(noise) for _ in range(words_per_text - 1)]
        tokens.insert(rng.randrange(words_per_text), words[y])
        texts.append(" ".join(tokens))
        labels.append(y)
    return TextDataset(tuple(texts), tuple(labels), tuple(f"class{k}" for k in range(num_labels)))


def partition(
    data: TextDataset, index: int, count: int, *, alpha: float | None = None, seed: int = 0
) -> TextDataset:
    """Part ``index`` (0-based) of ``count`` of a shared file: IID, or label skew with
    Dirichlet(``alpha``). Every worker computes the same split from the same seed, so the
    parts are disjoint and cover the file."""
    from fedpilot.core.partition import dirichlet_partition, iid_partition

    if not 0 <= index < count:
        raise ValueError(f"partition {index}/{count}: index must be in [0, {count})")
    parts = (
        iid_partition(len(data), count, seed)
        if alpha is None
        else dirichlet_partition(list(data.labels), count, alpha, seed)
    )
    chosen = parts[index]
    if len(chosen) == 0:
        raise ValueError(f"partition {index}/{count} of {len(data)} examples is empty")
    return data.subset(int(i) for i in chosen)
