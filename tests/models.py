"""Tiny random models saved as local HF directories: fast stand-ins for real ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# -- a tiny Llama-style decoder with a BPE tokenizer trained on its instructions ---------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A minimal chat template: each turn is ``<|role|>`` + content + ``</s>``."""

_WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rock"]


def instruction_rows(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic instruction-following rows: reverse, count, repeat or upper-case words.

    Each answer is a function of the prompt, so a model can learn it, and the
    format (``{"instruction", "input", "output"}``) is the one workers read.
    """
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 4))]
        kind = i % 4
        if kind == 0:
            rows.append(
                {
                    "instruction": "Reverse the words.",
                    "input": " ".join(words),
                    "output": " ".join(reversed(words)),
                }
            )
        elif kind == 1:
            rows.append(
                {
                    "instruction": "How many words are there?",
                    "input": " ".join(words),
                    "output": str(len(words)),
                }
            )
        elif kind == 2:
            rows.append(
                {
                    "instruction": f"Repeat the word {words[0]} twice.",
                    "input": "",
                    "output": f"{words[0]} {words[0]}",
                }
            )
        else:
            rows.append(
                {
                    "instruction": "Write the words in capitals.",
                    "input": " ".join(words),
                    "output": " ".join(w.upper() for w in words),
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_bpe_tokenizer(texts: list[str], *, vocab_size: int = 400) -> Any:
    """A byte-level BPE trained on ``texts`` in well under a second, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llama(path: Path, *, layers: int = TINY_LAYERS, chat_template: bool = True) -> Path:
    """A 64-wide Llama-style decoder (``LlamaForCausalLM``) and its trained BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [" ".join(r.values()) for r in instruction_rows(400, seed=123)]
    tokenizer = train_bpe_tokenizer(texts)
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, *, layers: int = TINY_LAYERS) -> Path:
    """A 32-wide GPT-2 (``transformer.h.N`` blocks, ``Conv1D`` projections), same tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_bpe_tokenizer([" ".join(r.values()) for r in instruction_rows(400, seed=123)])
    config = GPT2Config(
        n_layer=layers,
        n_embd=32,
        n_head=2,
        n_positions=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- a tiny ViT and scikit-learn's digits as an image folder -----------------------------------

DIGIT_SIZE = 32


def save_tiny_vit(path: Path, *, layers: int = TINY_LAYERS, labels: int = 10) -> Path:
    """A 64-wide ViT (32x32 images, 8x8 patches) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=DIGIT_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=labels,
        # Wider than the 0.02 of pretrained checkpoints: a random 64-wide ViT then gives
        # features that tell digits apart, so a few federated steps measurably learn.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    processor = ViTImageProcessor(
        size={"height": DIGIT_SIZE, "width": DIGIT_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(path)
    return path


def save_digits_folder(path: Path, indices: range | list[int], *, classes: int = 10) -> Path:
    """scikit-learn's 8x8 digits (a package's real data), upscaled to 32x32 RGB PNGs,
    one sub-folder per class (``0`` ... ``9``): the image-folder format workers read."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in indices:
        label = int(digits.target[i])
        if label >= classes:
            continue
        pixels = (digits.images[i] * (255 / 16)).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((DIGIT_SIZE, DIGIT_SIZE)).convert("RGB")
        folder = path / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    return path
