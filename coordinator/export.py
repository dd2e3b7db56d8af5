"""The global adapter as a standard PEFT adapter directory, and as a zip of one.

The directory is what ``PeftModel.from_pretrained(base, path)`` loads:
``adapter_config.json`` + ``adapter_model.safetensors``. It is written from the
module state with numpy and safetensors only, so the coordinator (and its
image) needs no torch, transformers or peft to hand out a trained adapter.

PEFT's file layout, which :mod:`tests.api.test_adapter_export` checks against
PEFT itself for several architectures:

- a LoRA module ``encoder.layer.0.attention.self.query`` of a model whose
  backbone attribute is ``bert`` is stored as
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``
  (and ``lora_B``);
- the task head (``classifier``, ``score``; PEFT's ``modules_to_save``) keeps
  its own tensor names: ``base_model.model.classifier.weight``.

The backbone attribute is the transformers class's ``base_model_prefix``,
found from the model's ``config.json`` ``model_type`` (:func:`backbone_prefix`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.coordinator.modelcheck import model_config

if TYPE_CHECKING:
    from fedpilot.worker.model import ModelSpec

ModuleTensors = Mapping[str, Mapping[str, np.ndarray]]

PEFT_PREFIX = "base_model.model."
LORA_TENSORS = frozenset({"lora_A", "lora_B"})
DEFAULT_MODEL_TYPE = "bert"
"""``model_type`` of the bundled all-MiniLM-L6-v2 (a job with an empty ``model``)."""

# transformers' ``base_model_prefix`` where it differs from ``model_type``
# (most encoders, e.g. bert, roberta, electra, albert, deberta, mpnet, use
# their model_type); decoders keep their backbone in ``model``.
_PREFIX_BY_MODEL_TYPE = {
    "big_bird": "bert",
    "camembert": "roberta",
    "deberta-v2": "deberta",
    "megatron-bert": "bert",
    "xlm-roberta": "roberta",
    "xlm-roberta-xl": "roberta",
    "xmod": "roberta",
    "modernbert": "model",
    "gemma": "model",
    "gemma2": "model",
    "gemma3_text": "model",
    "llama": "model",
    "mistral": "model",
    "mixtral": "model",
    "olmo": "model",
    "olmo2": "model",
    "opt": "model",
    "phi": "model",
    "phi3": "model",
    "qwen2": "model",
    "qwen2_moe": "model",
    "qwen3": "model",
    "qwen3_moe": "model",
    "stablelm": "model",
    "starcoder2": "model",
    "bloom": "transformer",
    "falcon": "transformer",
    "gpt2": "transformer",
    "gpt_bigcode": "transformer",
    "gpt_neo": "transformer",
    "gptj": "transformer",
}


class ExportError(ValueError):
    """The adapter cannot be written as a PEFT directory (says why)."""


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


def backbone_prefix(model_type: str) -> str:
    """The attribute holding the backbone in ``AutoModelForSequenceClassification``."""
    return _PREFIX_BY_MODEL_TYPE.get(model_type, model_type.replace("-", "_"))


def _model_type(spec: JobSpec) -> str:
    config = model_config(spec)
    if config is None:
        if spec.model:
            raise ExportError(
                f"cannot read {spec.model}/config.json on the coordinator: its model_type "
                "decides the adapter's key names; mount the model directory there"
            )
        return DEFAULT_MODEL_TYPE
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ExportError(f"the model's config.json has no model_type: {spec.model or 'default'}")
    return model_type


def peft_tensors(modules: ModuleTensors, prefix: str) -> dict[str, np.ndarray]:
    """Module state -> ``{PEFT key: float32 array}`` as ``save_pretrained`` names them."""
    out: dict[str, np.ndarray] = {}
    for name, tensors in modules.items():
        if not tensors:
            raise ExportError(f"module {name!r} has no tensors")
        is_lora = set(tensors) == LORA_TENSORS
        if not is_lora and set(tensors) & LORA_TENSORS:
            raise ExportError(f"module {name!r} mixes LoRA and head tensors: {sorted(tensors)}")
        for key, value in tensors.items():
            if is_lora:
                path = f"{PEFT_PREFIX}{prefix}.{name}.{key}.weight"
            else:
                path = f"{PEFT_PREFIX}{name}.{key}"
            array = np.asarray(value, dtype=np.float32)
            if not np.all(np.isfinite(array)):
                raise ExportError(f"module {name!r} tensor {key!r} has non-finite values")
            out[path] = np.ascontiguousarray(array)
    return out


_TASK_TYPE: dict[str, str | None] = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "image-classification": None,  # PEFT has no task type for it; the head is in modules_to_save
}


def adapter_config(spec: JobSpec, modules: ModuleTensors) -> dict[str, Any]:
    """``adapter_config.json``: a LoRA config of the job's task (``task_type``).

    Fields PEFT does not find take its defaults, so the file stays valid across
    PEFT versions; ``modules_to_save`` names the heads present in ``modules``
    (none for a causal LM, whose ``lm_head`` stays frozen). ``target_modules``
    is what workers gave PEFT: names, one pattern, or ``all-linear``.
    """
    from fedpilot.worker.targets import peft_targets

    heads = sorted(name for name, t in modules.items() if set(t) != LORA_TENSORS)
    targets = peft_targets(spec.lora.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": _TASK_TYPE[spec.task],
        "base_model_name_or_path": spec.model or None,
        "r": spec.lora.rank,
        "lora_alpha": spec.lora.alpha,
        "lora_dropout": spec.lora.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "modules_to_save": heads or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }


def write_adapter_dir(spec: JobSpec, modules: ModuleTensors, out_dir: Path) -> Path:
    """Write ``modules`` (the global adapter) as a PEFT adapter directory."""
    files = adapter_files(spec, modules)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return out_dir


def adapter_files(spec: JobSpec, modules: ModuleTensors) -> dict[str, bytes]:
    """File name -> content of the PEFT adapter directory."""
    tensors = peft_tensors(modules, backbone_prefix(_model_type(spec)))
    config = json.dumps(adapter_config(spec, modules), indent=2, sort_keys=True) + "\n"
    return {
        "adapter_config.json": config.encode(),
        # "pt": the format tag PEFT and transformers write (torch tensors on load)
        "adapter_model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
    }


def adapter_zip(spec: JobSpec, modules: ModuleTensors) -> bytes:
    """The adapter directory as zip bytes (files at the archive root)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(adapter_files(spec, modules).items()):
            zf.writestr(name, data)
    return buffer.getvalue()
