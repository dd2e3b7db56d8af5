"""Synthetic but realistically sized models for the algorithm benchmarks.

Sizes follow a BERT-base-like encoder (hidden 768, MLP 3072) with LoRA rank 8
on six targets per layer, AdamW (parameter + gradient + two moments), batch 8
x sequence 128 in float32: the byte counts a worker would measure.
"""

from __future__ import annotations

import numpy as np

from fedpilot.core.memory import MemoryModel, ModuleCost

TARGETS = {  # target: (in_features, out_features)
    "query": (768, 768),
    "key": (768, 768),
    "value": (768, 768),
    "attention.output.dense": (768, 768),
    "intermediate.dense": (768, 3072),
    "output.dense": (3072, 768),
}
F32 = 4


def encoder_memory(
    layers: int = 12, rank: int = 8, batch: int = 8, seq: int = 128, targets: int = 6
) -> MemoryModel:
    """Memory model of ``layers`` x ``targets`` LoRA modules."""
    tokens = batch * seq
    modules = []
    for layer in range(1, layers + 1):
        for target, (fan_in, fan_out) in list(TARGETS.items())[:targets]:
            params = rank * (fan_in + fan_out)
            modules.append(
                ModuleCost(
                    name=f"layer.{layer}.{target}",
                    layer=layer,
                    param_bytes=4 * params * F32,
                    extra_bytes=tokens * (fan_in + rank) * F32,
                )
            )
    return MemoryModel(
        base_bytes=110_000_000 * F32 + 40 * tokens * 768 * F32,
        layer_activation_bytes=tuple([30 * tokens * 768 * F32] * layers),
        modules=tuple(modules),
    )


def tiered_budgets(memory: MemoryModel, n: int, seed: int) -> list[int]:
    """Budgets that fit about 25%, 50% and 100% of the modules, in equal shares."""
    names = memory.module_names
    tiers = [
        memory.cost(names[len(names) * 3 // 4 :]),
        memory.cost(names[len(names) // 2 :]),
        memory.full_cost(),
    ]
    rng = np.random.default_rng(seed)
    return [int(tiers[i % 3] * rng.uniform(1.0, 1.05)) for i in range(n)]


def lora_update(memory: MemoryModel, rank: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Random LoRA factors for every module of ``encoder_memory`` (float32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in memory.modules:
        target = m.name.split(".", 2)[2]
        fan_in, fan_out = TARGETS[target]
        out[m.name] = {
            "lora_A": rng.standard_normal((rank, fan_in), dtype=np.float32),
            "lora_B": rng.standard_normal((fan_out, rank), dtype=np.float32),
        }
    return out
