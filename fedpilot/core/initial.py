"""The global adapter before any round (version 0), from tensor shapes alone.

Every worker must start from the same weights, including the task head that
transformers initialises randomly, so the coordinator creates them once,
seeded by the job. The scheme follows PEFT's and transformers' defaults:
``lora_A`` ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)),
``lora_B`` = 0 (so the adapted model starts equal to the base model), head
weight matrices ~ N(0, 0.02) and head biases 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedpilot.core.aggregation import LORA_A, LORA_B


def initial_adapter(
    shapes: Mapping[str, Mapping[str, Sequence[int]]], seed: int, *, init_std: float = 0.02
) -> dict[str, dict[str, np.ndarray]]:
    """Float32 tensors for ``{module: {tensor: shape}}``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {}
    for module in sorted(shapes):
        parts: dict[str, np.ndarray] = {}
        for part in sorted(shapes[module]):
            shape = tuple(int(d) for d in shapes[module][part])
            if part == LORA_A:
                bound = 1.0 / np.sqrt(shape[1])
                parts[part] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
            elif part == LORA_B or len(shape) < 2:
                parts[part] = np.zeros(shape, dtype=np.float32)
            else:
                parts[part] = rng.normal(0.0, init_std, size=shape).astype(np.float32)
        out[module] = parts
    return out
