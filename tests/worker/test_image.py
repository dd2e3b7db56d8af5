"""Image classification on the worker: image folders and saved datasets, the model's image
processor, a ViT with LoRA and a trained head, depth-aware memory and real training."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpilot.core.memory import HEAD_LAYER
from fedpilot.worker.data import DataError
from fedpilot.worker.model import ModelSpec, load_model, module_entries, module_layers
from fedpilot.worker.profiling import dummy_batch, measure_training_peak, profile_memory
from fedpilot.worker.tasks import data_task, get_task, read_local_data
from fedpilot.worker.training import train
from tests.models import DIGIT_SIZE, TINY_LAYERS, save_digits_folder, save_tiny_vit

DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_digits_folder(tmp_path_factory.mktemp("digits"), range(400))


def _spec(vit_dir: Path, **kw: object) -> ModelSpec:
    return ModelSpec(
        model_path=str(vit_dir),
        task="image-classification",
        num_labels=10,
        lora_rank=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj"),
        batch_size=16,
        **kw,  # type: ignore[arg-type]
    )


def test_image_folder_labels_follow_the_jobs_class_names(digits_dir: Path) -> None:
    local = read_local_data(digits_dir)
    assert local.task == "image-classification" and len(local) == 400
    task = get_task("image-classification")
    names = list(reversed(DIGITS))  # the job, not the folder order, decides the ids
    data = task.dataset(local, label_names=names, num_labels=None)
    first = Path(data.images[0])
    assert names[data.labels[0]] == first.parent.name
    only = task.dataset(local, label_names=["3", "7"], num_labels=None, skip_unknown_labels=True)
    assert 0 < len(only) < 400 and set(only.labels) == {0, 1}
    with pytest.raises(DataError, match="label outside the job"):
        task.dataset(local, label_names=["3", "7"], num_labels=None)


def test_saved_dataset_with_an_image_column(tmp_path: Path, digits_dir: Path) -> None:
    import datasets
    from PIL import Image

    files = sorted(digits_dir.glob("*/*.png"))[:30]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS)}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [Image.open(f) for f in files], "label": [int(f.parent.name) for f in files]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    assert data_task(tmp_path / "saved") == "image-classification"
    data = get_task("image-classification").dataset(
        read_local_data(tmp_path / "saved"), label_names=DIGITS, num_labels=None
    )
    assert list(data.labels) == [int(f.parent.name) for f in files]


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(DataError):
        read_local_data(tmp_path)


def test_batches_come_from_the_models_image_processor(vit_dir: Path, digits_dir: Path) -> None:
    spec = _spec(vit_dir)
    task = get_task("image-classification")
    data = task.dataset(read_local_data(digits_dir), label_names=DIGITS, num_labels=None)
    batches = task.batches(data.subset(range(40)), spec)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [
        (16, 3, DIGIT_SIZE, DIGIT_SIZE),
        (16, 3, DIGIT_SIZE, DIGIT_SIZE),
        (8, 3, DIGIT_SIZE, DIGIT_SIZE),
    ]
    pixels = batches[0]["pixel_values"]
    assert -1.0 <= float(pixels.min()) < 0 < float(pixels.max()) <= 1.0  # normalised to mean 0.5


def test_vit_layers_and_a_trained_classifier_head(vit_dir: Path) -> None:
    model = load_model(_spec(vit_dir))
    layers = module_layers(model)
    assert layers["classifier"] == HEAD_LAYER
    assert {layers[f"layers.{i}.attention.q_proj"] for i in range(TINY_LAYERS)} == {1, 2, 3}
    assert module_entries(model)["classifier"].is_head


def test_training_on_digits_lowers_the_loss(vit_dir: Path, digits_dir: Path) -> None:
    spec = _spec(vit_dir)
    model = load_model(spec)
    task = get_task("image-classification")
    data = task.dataset(read_local_data(digits_dir), label_names=DIGITS, num_labels=None)
    batches = task.batches(data, spec)
    result = train(model, list(module_layers(model)), batches, steps=20, lr=0.01)
    assert result.loss_after < result.loss_before - 0.1


def test_vit_memory_is_depth_aware_and_covers_a_real_step(vit_dir: Path) -> None:
    model = load_model(_spec(vit_dir))
    batch = dummy_batch(model, 16, 1)
    assert tuple(batch["pixel_values"].shape) == (16, 3, DIGIT_SIZE, DIGIT_SIZE)
    memory = profile_memory(model, batch)
    assert all(a > 0 for a in memory.layer_activation_bytes)
    low, top = "layers.0.attention.v_proj", f"layers.{TINY_LAYERS - 1}.attention.v_proj"
    assert memory.cost([low]) > memory.cost([top])
    measured = measure_training_peak(model, [low, "classifier"], batch)
    assert measured <= memory.cost([low, "classifier"])
