"""Tiny random models saved as local HF directories: fast stand-ins for real ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from fedpilot.worker.data import synthetic_words

TINY_LABELS = 3
TINY_LAYERS = 3
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_bert(path: Path, *, labels: int = TINY_LABELS, layers: int = TINY_LAYERS) -> Path:
    """A 64-wide BERT whose vocabulary covers :func:`synthetic_words`."""
    words = SPECIAL + synthetic_words(labels)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=labels,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
