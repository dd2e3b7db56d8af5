"""The global adapter's tensor shapes: bounded by the model and the job spec, agreed by
the participants, never set by one worker alone.

Every profile's shapes are checked when it arrives: LoRA factors have the job's
rank (``lora_A`` is ``[rank, in]``, ``lora_B`` is ``[out, rank]``) and sit in a
targeted module, no dimension exceeds the model's largest (from its config.json
where the coordinator can read it, else ``max_tensor_dim``), and the whole
adapter fits ``max_adapter_bytes``. Version 0 then takes the shapes most
participants reported; once it exists, a profile that differs is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpilot.core.aggregation import LORA_A, LORA_B, SEPARATOR
from fedpilot.v1 import errors_pb2
from fedpilot.wire import WireError
from fedpilot.worker.targets import ALL_LINEAR, peft_targets

Shapes = Mapping[str, Sequence[int]]

_DIM_KEYS = (
    "hidden_size",
    "intermediate_size",
    "d_model",
    "n_embd",
    "n_inner",
    "dim",
    "hidden_dim",
    "ffn_dim",
    "d_ff",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "vocab_size",
    "num_labels",
)


@dataclass(frozen=True)
class AdapterBounds:
    rank: int
    target_modules: tuple[str, ...]
    max_dim: int
    max_bytes: int
    max_tensors: int


def model_max_dim(config: Mapping[str, Any] | None, fallback: int) -> int:
    """The largest tensor dimension the model can have (``fallback`` if unknown).

    Fused projections (query/key/value in one matrix, gated MLPs) stay within 4x the
    largest size the config names."""
    best = _largest(config) if config else 0
    return 4 * best if best else fallback


def _largest(config: Mapping[str, Any]) -> int:
    dims = [
        v
        for k in _DIM_KEYS
        for v in [config.get(k)]
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            dims.append(_largest(config[sub]))
    return max(dims, default=0)


def _refuse(reason: int, message: str, name: str) -> WireError:
    return WireError(reason, message, f"profile.tensors[{name}]")


def _targeted(module: str, targets: Sequence[str]) -> bool:
    """PEFT's matching (:mod:`fedpilot.worker.targets`): names as suffixes, one pattern
    (which starts with ``.*``, so the module's short name is matched like its full path),
    or every linear layer."""
    resolved = peft_targets(targets)
    if resolved == ALL_LINEAR:
        return True
    if isinstance(resolved, str):
        return re.fullmatch(resolved, module) is not None
    return any(module == t or module.endswith("." + t) for t in resolved)


def check_shapes(tensors: Shapes, bounds: AdapterBounds) -> None:
    """Raise a WireError naming the first tensor the model and the spec cannot have."""
    if len(tensors) > bounds.max_tensors:
        raise WireError(
            errors_pb2.ERROR_REASON_MALFORMED,
            f"profile lists {len(tensors)} tensors; at most {bounds.max_tensors}",
            "profile.tensors",
        )
    total = 0
    for name, shape in tensors.items():
        module, _, part = name.rpartition(SEPARATOR)
        dims = list(shape)
        if not 1 <= len(dims) <= 4 or any(not 1 <= d <= bounds.max_dim for d in dims):
            raise _refuse(
                errors_pb2.ERROR_REASON_SHAPE_MISMATCH,
                f"{name!r} has shape {dims[:8]}: 1 to 4 dimensions of 1 to {bounds.max_dim} "
                "(the model's largest)",
                name,
            )
        if part in (LORA_A, LORA_B):
            rank = dims[0] if part == LORA_A else dims[-1]
            if len(dims) != 2 or rank != bounds.rank:
                raise _refuse(
                    errors_pb2.ERROR_REASON_SHAPE_MISMATCH,
                    f"{name!r} has shape {dims}; the job's LoRA rank is {bounds.rank}",
                    name,
                )
            if not _targeted(module, bounds.target_modules):
                raise _refuse(
                    errors_pb2.ERROR_REASON_UNKNOWN_TENSOR,
                    f"{module!r} is not one of the job's target modules "
                    f"{list(bounds.target_modules)}",
                    name,
                )
        total += math.prod(dims) * 4
        if total > bounds.max_bytes:
            raise _refuse(
                errors_pb2.ERROR_REASON_STREAM_TOO_LARGE,
                f"the adapter exceeds {bounds.max_bytes} bytes (max_adapter_bytes) at {name!r}",
                name,
            )


def first_difference(tensors: Shapes, expected: Shapes) -> str | None:
    """A sentence naming the first tensor where ``tensors`` differs from ``expected``."""
    for name in sorted(set(tensors) | set(expected)):
        if name not in expected:
            return f"{name!r} is not a tensor of the global adapter"
        if name not in tensors:
            return f"{name!r} of the global adapter is missing"
        if list(tensors[name]) != list(expected[name]):
            got, want = list(tensors[name]), list(expected[name])
            return f"{name!r} has shape {got}, the global adapter {want}"
    return None


def agreed_shapes(candidates: Sequence[Shapes]) -> dict[str, list[int]]:
    """The shapes most profiles report; a tie goes to the smaller adapter (then a fixed
    order), so one worker among honest ones cannot choose them."""
    if not candidates:
        raise ValueError("no profile to take adapter shapes from")
    keyed = {_key(c): c for c in candidates}
    votes = Counter(_key(c) for c in candidates)

    def rank(key: str) -> tuple[int, int, str]:
        shapes = keyed[key]
        return (-votes[key], sum(math.prod(s) for s in shapes.values()), key)

    best = min(votes, key=rank)
    return {k: list(v) for k, v in keyed[best].items()}


def _key(shapes: Shapes) -> str:
    return json.dumps({k: list(v) for k, v in sorted(shapes.items())}, separators=(",", ":"))
