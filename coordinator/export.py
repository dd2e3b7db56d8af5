"""The global adapter as a standard PEFT adapter directory, and as a zip of one.

The directory is what ``PeftModel.from_pretrained(base, path)`` loads:
``adapter_config.json`` + ``adapter_model.safetensors``. It is written by PEFT
itself from the job's model, so its key names and config always match the
installed PEFT version. Needs the worker extra (torch, transformers, peft).
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedpilot.coordinator.jobspec import JobSpec

if TYPE_CHECKING:
    from fedpilot.worker.model import ModelSpec

ModuleTensors = Mapping[str, Mapping[str, np.ndarray]]


def model_spec(spec: JobSpec, *, batch_size: int | None = None) -> ModelSpec:
    """The worker-side model description of a job (what workers build from the JobConfig)."""
    from fedpilot.worker.model import ModelSpec

    return ModelSpec(
        model_path=spec.model or None,
        num_labels=spec.num_labels,
        lora_rank=spec.lora.rank,
        lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]  # PEFT accepts a float alpha
        lora_dropout=spec.lora.dropout,
        target_modules=tuple(spec.lora.target_modules),
        dtype=spec.dtype,
        max_seq_len=spec.max_seq_len,
        batch_size=batch_size or spec.batch_size,
        task=spec.task,
    )


def write_adapter_dir(spec: JobSpec, modules: ModuleTensors, out_dir: Path) -> Path:
    """Write ``modules`` (the global adapter) as a PEFT adapter directory."""
    from fedpilot.worker.model import load_model, save_adapter

    model = load_model(model_spec(spec), seed=spec.seed)
    return save_adapter(model, out_dir, modules)


def adapter_zip(spec: JobSpec, modules: ModuleTensors) -> bytes:
    """The adapter directory as zip bytes (files at the archive root)."""
    with tempfile.TemporaryDirectory(prefix="fedpilot-export-") as tmp:
        root = write_adapter_dir(spec, modules, Path(tmp))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                zf.write(path, path.relative_to(root).as_posix())
        return buffer.getvalue()
