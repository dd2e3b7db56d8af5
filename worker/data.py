"""Local text-classification data: reading, label ids, class selection, tokenized batches.

A worker reads its own examples from one of three formats:

* CSV (``.csv``) with a header row;
* JSON Lines (``.jsonl`` or ``.ndjson``), one JSON object per line;
* a Hugging Face ``datasets`` dataset written with ``save_to_disk`` (a directory;
  needs the optional ``datasets`` package, imported only for this format).

The text and label columns are found by name (``text``/``sentence``/``content``
and ``label``/``category``/``intent``/``class``) or given explicitly.

Label ids must mean the same class on every worker, without workers talking to
each other, so they never depend on which labels one worker's shard happens to
contain:

* the job lists its class names (``labels`` in the job spec): id ``i`` is the
  ``i``-th name; a label column of names (or a ``ClassLabel`` column, by its
  names) is mapped through that list;
* the job lists no names: the label column must hold class ids
  ``0 .. num_labels - 1`` (integers, or strings of digits).

A label outside the job's classes is skipped by the worker by default, with a
count in its log: a shared file often holds more classes than one job uses (the
full BANKING77 file and a 20-intent job). ``--strict-labels`` makes it an error;
:func:`to_dataset` itself is strict unless asked to skip.

Every problem with the data raises :class:`DataError` (a ``ValueError``) naming
the file and, where there is one, the line or row, before anything is trained.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Batch = dict[str, torch.Tensor]

TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "category", "intent", "class")
FORMATS = "a .csv file, a .jsonl file, or a directory written by datasets' save_to_disk"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SHOWN = 5  # offending examples quoted in an error message

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the place."""


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


@dataclass(frozen=True)
class Examples:
    """Examples as read from a source, before their labels become ids."""

    texts: tuple[str, ...]
    labels: tuple[str | int, ...]
    positions: tuple[int, ...]
    """Where each example is: its line (CSV, JSON Lines, 1-based) or row (datasets, 0-based)."""
    source: str
    unit: str = "line"
    class_names: tuple[str, ...] = ()
    """Names of a ``ClassLabel`` column (datasets): its integer values index them."""

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, i: int) -> str:
        return f"{self.unit} {self.positions[i]}"


# -- reading ------------------------------------------------------------------------------


def _pick_column(
    available: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str
) -> str:
    if wanted is not None:
        if wanted not in available:
            raise DataError(f"{where}: no {what} column {wanted!r}; columns are {list(available)}")
        return wanted
    for c in candidates:
        if c in available:
            return c
    raise DataError(
        f"{where}: no {what} column: none of {list(candidates)} in {list(available)} "
        f"(name it with --{what}-column)"
    )


def _check_label(value: Any, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: the label must be a string or an integer, got {value!r}")
    return value


def _finish(
    path: Path,
    texts: list[str],
    labels: list[str | int],
    positions: list[int],
    *,
    empty: str,
    unit: str = "line",
    class_names: tuple[str, ...] = (),
) -> Examples:
    if not texts:
        raise DataError(f"{path}: {empty}")
    return Examples(tuple(texts), tuple(labels), tuple(positions), str(path), unit, class_names)


def _read_csv(path: Path, text_column: str | None, label_column: str | None) -> Examples:
    texts: list[str] = []
    labels: list[str | int] = []
    positions: list[int] = []
    reader: Any = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty")
            tcol = _pick_column(header, text_column, TEXT_COLUMNS, "text", f"{path}: header")
            lcol = _pick_column(header, label_column, LABEL_COLUMNS, "label", f"{path}: header")
            ti, li = header.index(tcol), header.index(lcol)
            need = max(ti, li) + 1
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) < need:
                    missing = tcol if len(row) <= ti else lcol
                    raise DataError(
                        f"{path}: line {reader.line_num} has {len(row)} fields and no value "
                        f"for column {missing!r}"
                    )
                texts.append(row[ti])
                labels.append(row[li])
                positions.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        line = reader.line_num if reader is not None else 0
        raise DataError(f"{path}: line {line}: unreadable CSV ({e})") from e
    return _finish(path, texts, labels, positions, empty="a header but no rows")


def _read_jsonl(path: Path, text_column: str | None, label_column: str | None) -> Examples:
    texts: list[str] = []
    labels: list[str | int] = []
    positions: list[int] = []
    tcol = lcol = ""
    try:
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}: line {number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON: {e.msg} (column {e.colno})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{where} is a JSON {type(obj).__name__}, not an object")
                if not tcol:  # the first object decides which keys are the columns
                    keys = list(obj)
                    tcol = _pick_column(keys, text_column, TEXT_COLUMNS, "text", where)
                    lcol = _pick_column(keys, label_column, LABEL_COLUMNS, "label", where)
                for col in (tcol, lcol):
                    if obj.get(col) is None:
                        raise DataError(f"{where} has no {col!r} field")
                if not isinstance(obj[tcol], str):
                    raise DataError(f"{where}: {tcol!r} must be a string, got {obj[tcol]!r}")
                texts.append(obj[tcol])
                labels.append(_check_label(obj[lcol], where))
                positions.append(number)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    empty = "no JSON lines (the file is empty)" if not tcol else "no examples"
    return _finish(path, texts, labels, positions, empty=empty)


def _read_saved_dataset(path: Path, text_column: str | None, label_column: str | None) -> Examples:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{path} is a directory, read as a Hugging Face dataset saved with save_to_disk, "
            "which needs the 'datasets' package (pip install datasets); "
            "CSV and JSON Lines files need nothing extra"
        ) from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
    except IndexError as e:  # datasets cannot load what it saved for zero rows
        raise DataError(f"{path}: the dataset has no rows (no data files)") from e
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(
                f"{path}: a dataset with splits {splits} and none named 'train'; "
                f"point --data at one split's directory"
            )
        loaded = loaded[split]
    where = f"{path}: dataset"
    tcol = _pick_column(loaded.column_names, text_column, TEXT_COLUMNS, "text", where)
    lcol = _pick_column(loaded.column_names, label_column, LABEL_COLUMNS, "label", where)
    feature = loaded.features[lcol]
    class_names = (
        tuple(feature.names) if isinstance(feature, datasets.ClassLabel) and feature.names else ()
    )
    texts: list[str] = []
    labels: list[str | int] = []
    for i, (text, label) in enumerate(zip(loaded[tcol], loaded[lcol], strict=True)):
        if not isinstance(text, str):
            raise DataError(f"{path}: row {i}: {tcol!r} must be a string, got {text!r}")
        texts.append(text)
        labels.append(_check_label(label, f"{path}: row {i}"))
    return _finish(
        path,
        texts,
        labels,
        list(range(len(texts))),
        unit="row",
        class_names=class_names,
        empty="the dataset has no rows",
    )


def read_examples(
    path: str | Path, *, text_column: str | None = None, label_column: str | None = None
) -> Examples:
    """Read texts and raw labels from a CSV or JSON Lines file or a saved dataset directory.

    Fails with :class:`DataError` on a missing file, an unknown format, a missing
    column, an unreadable line, or no examples at all."""
    p = Path(path)
    if p.is_dir():
        return _read_saved_dataset(p, text_column, label_column)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return _read_csv(p, text_column, label_column)
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(p, text_column, label_column)
    raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'!r}; use {FORMATS}")


# -- label ids ------------------------------------------------------------------------------


def _as_id(value: str | int) -> int | None:
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.isdecimal() else None


def to_dataset(
    examples: Examples,
    *,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    skip_unknown_labels: bool = False,
) -> TextDataset:
    """Map raw labels to the job's class ids (see the module docstring).

    ``label_names``: the job's class names in id order. Without them, ``num_labels``
    makes the labels class ids; with neither, the sorted names found are used (only
    right when one file holds every class, e.g. a held-out set or a whole benchmark).
    Labels outside the classes raise :class:`DataError` unless ``skip_unknown_labels``.
    """
    ids_mode = not label_names and num_labels is not None
    if label_names:
        names = tuple(label_names)
    elif ids_mode:
        assert num_labels is not None
        if num_labels < 1:
            raise DataError(f"{examples.source}: the job has {num_labels} classes")
        names = tuple(str(i) for i in range(num_labels))
    elif examples.class_names:
        names = examples.class_names
    else:
        names = tuple(sorted({str(v) for v in examples.labels}))
    index = {name: i for i, name in enumerate(names)}
    texts: list[str] = []
    ids: list[int] = []
    unknown: list[int] = []
    for i, value in enumerate(examples.labels):
        if ids_mode:
            cid = _as_id(value)  # a ClassLabel's integer is the id too
            if cid is None:
                raise DataError(
                    f"{examples.source}: {examples.where(i)}: label {value!r} is not a "
                    f"class id; the job names no labels, so labels must be ids 0..."
                    f"{len(names) - 1} (or list the class names in the job's 'labels')"
                )
            y = cid
            if not 0 <= y < len(names):
                unknown.append(i)
                continue
        else:
            if examples.class_names and isinstance(value, int):
                if not 0 <= value < len(examples.class_names):
                    unknown.append(i)  # e.g. -1, datasets' "no label"
                    continue
                value = examples.class_names[value]
            found = index.get(str(value))
            if found is None:
                unknown.append(i)
                continue
            y = found
        texts.append(examples.texts[i])
        ids.append(y)
    if unknown:
        shown = ", ".join(f"{examples.where(i)}: {examples.labels[i]!r}" for i in unknown[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        classes = (
            f"ids 0..{len(names) - 1}"
            if ids_mode
            else f"{len(names)} labels {list(names[:10])}{' ...' if len(names) > 10 else ''}"
        )
        outside = (
            f"{examples.source}: {len(unknown)} of {len(examples)} examples have a label "
            f"outside the job's {classes} ({shown}{more})"
        )
        if not skip_unknown_labels:
            raise DataError(
                f"{outside}; fix the data, or skip those examples (the worker's default, "
                "--skip-unknown-labels)"
            )
        log.info("%s; skipped them, %d examples left", outside, len(texts))
    if not texts:
        raise DataError(
            f"{examples.source}: none of its {len(examples)} examples has one of the job's labels"
        )
    return TextDataset(tuple(texts), tuple(ids), names)


def load_data(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    skip_unknown_labels: bool = False,
) -> TextDataset:
    """:func:`read_examples` then :func:`to_dataset`: a worker's data with the job's ids."""
    examples = read_examples(path, text_column=text_column, label_column=label_column)
    return to_dataset(
        examples,
        label_names=label_names,
        num_labels=num_labels,
        skip_unknown_labels=skip_unknown_labels,
    )


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
    examples = _read_csv(Path(path), text_column, label_column)
    return to_dataset(examples, label_names=label_names, skip_unknown_labels=True)


# -- selection, batches, synthetic data, partitions -------------------------------------------


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
    data: Any, index: int, count: int, *, alpha: float | None = None, seed: int = 0
) -> Any:
    """Part ``index`` (0-based) of ``count`` of a shared file: IID, or label skew with
    Dirichlet(``alpha``). Every worker computes the same split from the same seed, so the
    parts are disjoint and cover the file. ``data`` is any dataset with ``len`` and
    ``subset`` (texts, images, conversations); label skew needs ``labels``."""
    from fedpilot.core.partition import dirichlet_partition, iid_partition

    if not 0 <= index < count:
        raise ValueError(f"partition {index}/{count}: index must be in [0, {count})")
    if alpha is not None and not hasattr(data, "labels"):
        raise DataError("a label-skew (Dirichlet) partition needs labelled data; use IID")
    parts = (
        iid_partition(len(data), count, seed)
        if alpha is None
        else dirichlet_partition(list(data.labels), count, alpha, seed)
    )
    chosen = parts[index]
    if len(chosen) == 0:
        raise DataError(f"partition {index}/{count} of {len(data)} examples is empty")
    return data.subset(int(i) for i in chosen)
