"""Worker fixtures on the tiny random BERT of tests/models.py."""

from pathlib import Path

import pytest
from peft import PeftModel

from fedpilot.worker.model import ModelSpec, load_model
from tests.models import TINY_LABELS


@pytest.fixture
def tiny_spec(tiny_dir: Path) -> ModelSpec:
    return ModelSpec(
        model_path=str(tiny_dir),
        num_labels=TINY_LABELS,
        lora_rank=4,
        lora_alpha=8.0,
        max_seq_len=32,
        batch_size=8,
    )


@pytest.fixture
def tiny_model(tiny_spec: ModelSpec) -> PeftModel:
    return load_model(tiny_spec)
