"""Fixtures: a tiny random BERT with a WordPiece vocabulary, saved as a local model directory."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from fedpilot.worker.data import synthetic_words
from fedpilot.worker.model import ModelSpec, load_model

TINY_LABELS = 3
TINY_LAYERS = 3
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    words = SPECIAL + synthetic_words(TINY_LABELS)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=TINY_LABELS,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
