"""Load an adapter downloaded from the stack with PEFT and check that it was trained.

    python tests/deploy/stack/load_adapter.py ADAPTER_DIR JOB_SPEC

``PeftModel.from_pretrained`` on the bundled all-MiniLM-L6-v2 with the job's
labels; every LoRA factor present; ``lora_B`` (zero before training) non-zero;
accuracy on BANKING77's test rows of the job's labels printed next to chance
and required to beat it. Exits non-zero with a message on any failure.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedpilot.datasets import banking77_dir
from fedpilot.worker.model import ModelSpec, default_model_path, get_module_state, load_tokenizer


def main(adapter_dir: Path, spec_path: Path) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    labels: list[str] = spec["labels"]
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    base = AutoModelForSequenceClassification.from_pretrained(
        str(default_model_path()), num_labels=len(labels)
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    state = get_module_state(model)
    lora = {n: t for n, t in state.items() if "lora_B" in t}
    expected = 6 * len(spec["lora"]["target_modules"])  # MiniLM-L6: 6 layers
    assert len(lora) == expected, f"{len(lora)} LoRA modules, expected {expected}"
    trained = [n for n, t in lora.items() if np.any(t["lora_B"] != 0)]
    assert trained, "every lora_B is zero: the adapter was never trained"

    index = {name: i for i, name in enumerate(labels)}
    with (banking77_dir() / "test.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in index]
    tokenizer = load_tokenizer(ModelSpec(num_labels=len(labels)))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            enc = tokenizer(
                [r["text"] for r in batch],
                truncation=True,
                max_length=spec["max_seq_len"],
                padding=True,
                return_tensors="pt",
            )
            predicted = model(**enc).logits.argmax(-1).tolist()
            correct += sum(p == index[r["category"]] for p, r in zip(predicted, batch, strict=True))
    accuracy = correct / len(rows)
    chance = 1 / len(labels)
    print(
        f"adapter loaded with PeftModel.from_pretrained: {len(lora)} LoRA modules "
        f"({len(trained)} trained) + head; accuracy {accuracy:.3f} on {len(rows)} "
        f"BANKING77 test rows of the job's {len(labels)} labels (chance {chance:.3f})"
    )
    assert accuracy > chance, f"accuracy {accuracy:.3f} is not above chance {chance:.3f}"


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except AssertionError as e:
        sys.exit(f"adapter check failed: {e}")
