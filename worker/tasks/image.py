"""Image classification data: an image folder or a saved ``datasets`` directory.

* Image folder: one sub-folder per class, named after the class
  (``train/cat/001.png``); files with an image suffix are read with Pillow, in a
  fixed shuffled order so that batches mix the classes.
* A ``datasets`` dataset written with ``save_to_disk`` (a directory holding
  ``dataset_info.json`` or ``dataset_dict.json``) with an ``Image`` column
  (``image`` or ``img``) and a label column (``label``, ``labels``, ``fine_label``...).

Labels become the job's class ids exactly as for text (see
:mod:`fedpilot.worker.data`): through the job's class names, or as ids when the
job names none. Images go through the model directory's image processor
(resize, rescale, normalise), so every batch has the shape the profile measured.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpilot.worker.data import Batch, DataError, Examples, to_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "category", "class")
_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class ImageExamples:
    """Images (paths, or in-memory images from a dataset) and raw labels."""

    images: tuple[Any, ...]
    examples: Examples
    """The labels, positions and class names, as for text (texts are the image names)."""

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ImageDataset:
    images: tuple[Any, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> ImageDataset:
        idx = list(indices)
        return ImageDataset(
            tuple(self.images[i] for i in idx), tuple(self.labels[i] for i in idx), self.label_names
        )


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _DATASET_MARKERS)


def is_image_folder(path: Path) -> bool:
    """A directory (not a saved dataset) whose sub-folders hold image files."""
    if not path.is_dir() or is_saved_dataset(path):
        return False
    return any(
        f.suffix.lower() in IMAGE_SUFFIXES
        for d in path.iterdir()
        if d.is_dir()
        for f in d.iterdir()
    )


def _read_folder(path: Path) -> ImageExamples:
    images: list[str] = []
    labels: list[str | int] = []
    for folder in sorted(d for d in path.iterdir() if d.is_dir()):
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                images.append(str(f))
                labels.append(folder.name)
    if not images:
        raise DataError(f"{path}: no images in class sub-folders (suffixes {IMAGE_SUFFIXES})")
    # Folders list one class after another: batches cut from that order would each hold a
    # single class. A fixed shuffle mixes them and stays the same on every read.
    order = list(range(len(images)))
    random.Random(0).shuffle(order)
    images = [images[i] for i in order]
    labels = [labels[i] for i in order]
    names = tuple(Path(i).name for i in images)
    examples = Examples(names, tuple(labels), tuple(range(len(images))), str(path), "image")
    return ImageExamples(tuple(images), examples)


def _read_dataset(path: Path) -> ImageExamples:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, IndexError) as e:
        raise DataError(f"{path}: not a readable dataset saved with save_to_disk ({e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(f"{path}: splits {list(loaded)} and none named 'train'")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    image_col = next((c for c in IMAGE_COLUMNS if c in loaded.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in loaded.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(
            f"{path}: need an image column {IMAGE_COLUMNS} and a label column {LABEL_COLUMNS}; "
            f"columns are {loaded.column_names}"
        )
    feature = loaded.features[label_col]
    class_names = (
        tuple(feature.names) if isinstance(feature, datasets.ClassLabel) and feature.names else ()
    )
    labels: list[str | int] = []
    for i, value in enumerate(loaded[label_col]):
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DataError(f"{path}: row {i}: label must be a string or an integer")
        labels.append(value)
    if not labels:
        raise DataError(f"{path}: the dataset has no rows")
    images = tuple(loaded[image_col])
    examples = Examples(
        tuple(f"row {i}" for i in range(len(labels))),
        tuple(labels),
        tuple(range(len(labels))),
        str(path),
        "row",
        class_names,
    )
    return ImageExamples(images, examples)


def is_image_source(path: Path) -> bool:
    """An image folder, or a saved dataset with an image column."""
    if is_image_folder(path):
        return True
    if not is_saved_dataset(path):
        return False
    try:
        info = (path / "dataset_info.json").read_text(encoding="utf-8")
    except OSError:
        info = ""
    return '"Image"' in info or any(
        '"Image"' in (d / "dataset_info.json").read_text(encoding="utf-8")
        for d in path.iterdir()
        if (d / "dataset_info.json").is_file()
    )


def read_images(path: str | Path) -> ImageExamples:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: image data is a folder of class sub-folders or a saved dataset")
    return _read_dataset(p) if is_saved_dataset(p) else _read_folder(p)


def to_image_dataset(
    raw: ImageExamples,
    *,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    skip_unknown_labels: bool = False,
) -> ImageDataset:
    """Map labels to the job's class ids with the same rules as text."""
    # Text stand-ins carry each image's index, so the kept images follow the kept labels.
    indexed = Examples(
        tuple(str(i) for i in range(len(raw.images))),
        raw.examples.labels,
        raw.examples.positions,
        raw.examples.source,
        raw.examples.unit,
        raw.examples.class_names,
    )
    mapped = to_dataset(
        indexed,
        label_names=label_names,
        num_labels=num_labels,
        skip_unknown_labels=skip_unknown_labels,
    )
    images = tuple(raw.images[int(i)] for i in mapped.texts)
    return ImageDataset(images, mapped.labels, mapped.label_names)


def _open(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, str):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except OSError as e:
            raise DataError(f"{image}: not a readable image ({e})") from e
    return image.convert("RGB") if hasattr(image, "convert") else image


def make_batches(data: ImageDataset, processor: Any, *, batch_size: int) -> list[Batch]:
    """``pixel_values`` from the model's image processor, and ``labels``."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    batches = []
    for start in range(0, len(data), batch_size):
        images = [_open(x) for x in data.images[start : start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor(data.labels[start : start + batch_size], dtype=torch.long)
        batches.append({"pixel_values": pixels, "labels": labels})
    return batches


def dummy_batch(config: Any, batch_size: int, *, seed: int = 0) -> Batch:
    """Random pixels at the model's image size: memory depends on the shape only."""
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(config, "num_channels", 3)
    pixels = torch.randn((batch_size, channels, h, w), generator=g)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=g)
    return {"pixel_values": pixels, "labels": labels}
