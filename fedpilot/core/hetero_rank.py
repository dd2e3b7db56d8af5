"""Rank-heterogeneous baselines: HetLoRA (Cho et al. 2024) and FlexLoRA (Bai et al. 2024).

Both give every client every LoRA module but a rank ``r_i <= r`` that its
budget allows; the global adapter keeps the full rank ``r``. A client of rank
``r_i`` starts from the global factors truncated to their first ``r_i``
components (rows of ``A``, columns of ``B``; the rest zero). Zeroed components
of a LoRA pair get zero gradients (``dL/dB_j ~ A_j``, ``dL/dA_j ~ B_j``), so
local training keeps the rank without any mask.

- **HetLoRA**: zero-padded factors averaged with *sparsity weights*, each
  client's weight proportional to ``||B_i A_i||_F`` (times its sample count);
  **rank self-pruning**: a client drops its last rank component for later rounds when that
  component carries less than ``prune_ratio`` of its product's norm.
  Simplified: no rank regulariser in the local loss.
- **FlexLoRA**: the full-size products ``B_i A_i`` averaged by sample counts,
  then a truncated SVD back to rank ``r``; a client takes the first ``r_i``
  singular components (the best rank-``r_i`` approximation).

Non-LoRA modules (a classification head) are averaged by sample counts in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedpilot.core.aggregation import LORA_A, LORA_B, Module, is_lora, product, refactorise
from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost


@dataclass(frozen=True)
class RankedUpdate:
    """One client's trained modules (zero beyond its rank) with its rank and sample count."""

    client: str
    num_samples: int
    rank: int
    modules: Mapping[str, Module]


def truncate(module: Module, rank: int) -> dict[str, np.ndarray]:
    """The module with LoRA components ``rank..`` zeroed (a copy; non-LoRA modules copied)."""
    out = {k: np.array(v, copy=True) for k, v in module.items()}
    if is_lora(module):
        if not 1 <= rank <= module[LORA_A].shape[0]:
            raise ValueError(f"rank {rank} outside 1..{module[LORA_A].shape[0]}")
        out[LORA_A][rank:] = 0
        out[LORA_B][:, rank:] = 0
    return out


def truncate_all(modules: Mapping[str, Module], rank: int) -> dict[str, dict[str, np.ndarray]]:
    return {name: truncate(m, rank) for name, m in modules.items()}


def rank_memory(memory: MemoryModel, rank: int, full_rank: int) -> MemoryModel:
    """The memory model with every LoRA module's parameter bytes scaled to ``rank``.

    Activations (``a_l``) and extra activations (``e_m``) are kept: the input
    to ``lora_A`` does not shrink with the rank, so this stays conservative.
    The head (a full matrix) keeps its cost.
    """
    if not 1 <= rank <= full_rank:
        raise ValueError(f"rank {rank} outside 1..{full_rank}")
    modules = tuple(
        m
        if m.layer == HEAD_LAYER
        else ModuleCost(m.name, m.layer, -(-m.param_bytes * rank // full_rank), m.extra_bytes)
        for m in memory.modules
    )
    return MemoryModel(memory.base_bytes, memory.layer_activation_bytes, modules)


def rank_for_budget(memory: MemoryModel, budget: int, full_rank: int) -> int:
    """The largest rank at which training every module fits ``budget``; 0 if none does."""
    for rank in range(full_rank, 0, -1):
        if rank_memory(memory, rank, full_rank).full_cost() <= budget:
            return rank
    return 0


def _weighted_mean(parts: Sequence[tuple[float, np.ndarray]]) -> np.ndarray:
    total = sum(w for w, _ in parts)
    acc = np.zeros_like(parts[0][1], dtype=np.float64)
    for w, x in parts:
        acc += (w / total) * x
    out: np.ndarray = acc.astype(parts[0][1].dtype)
    return out


def _check(global_modules: Mapping[str, Module], updates: Sequence[RankedUpdate]) -> None:
    if not updates:
        raise ValueError("no updates to aggregate")
    for u in updates:
        if u.num_samples <= 0:
            raise ValueError(f"client {u.client!r}: num_samples must be > 0")
        for name, parts in u.modules.items():
            ref = global_modules.get(name)
            if ref is None or parts.keys() != ref.keys():
                raise ValueError(f"client {u.client!r}: module {name!r} does not match")
            for k, x in parts.items():
                if x.shape != ref[k].shape or not np.isfinite(x).all():
                    raise ValueError(f"client {u.client!r}, {name}/{k}: bad shape or values")


def aggregate_hetlora(
    global_modules: Mapping[str, Module], updates: Sequence[RankedUpdate]
) -> dict[str, dict[str, np.ndarray]]:
    """Zero-padded, sparsity-weighted average of factors (HetLoRA)."""
    _check(global_modules, updates)
    out = {name: dict(m) for name, m in global_modules.items()}
    for name, current in global_modules.items():
        trained = [u for u in updates if name in u.modules]
        if not trained:
            continue
        if is_lora(current):
            weights = [
                u.num_samples * float(np.linalg.norm(product(u.modules[name]))) for u in trained
            ]
            if sum(weights) <= 0:  # every product zero: plain sample weights
                weights = [float(u.num_samples) for u in trained]
        else:
            weights = [float(u.num_samples) for u in trained]
        out[name] = {
            k: _weighted_mean(
                [(w, u.modules[name][k]) for w, u in zip(weights, trained, strict=True)]
            )
            for k in current
        }
    return out


def aggregate_flexlora(
    global_modules: Mapping[str, Module], updates: Sequence[RankedUpdate]
) -> dict[str, dict[str, np.ndarray]]:
    """Sample-weighted average of full-size products, SVD back to the global rank (FlexLoRA)."""
    _check(global_modules, updates)
    out = {name: dict(m) for name, m in global_modules.items()}
    for name, current in global_modules.items():
        trained = [u for u in updates if name in u.modules]
        if not trained:
            continue
        weights = [float(u.num_samples) for u in trained]
        if is_lora(current):
            w = _weighted_mean(
                [(wt, product(u.modules[name])) for wt, u in zip(weights, trained, strict=True)]
            )
            a, b = refactorise(w, current[LORA_A].shape[0])
            out[name] = {
                LORA_A: a.astype(current[LORA_A].dtype),
                LORA_B: b.astype(current[LORA_B].dtype),
            }
        else:
            out[name] = {
                k: _weighted_mean(
                    [(wt, u.modules[name][k]) for wt, u in zip(weights, trained, strict=True)]
                )
                for k in current
            }
    return out


def prune_rank(modules: Mapping[str, Module], rank: int, prune_ratio: float) -> int:
    """HetLoRA's self-pruning: ``rank - 1`` when the last component's share of the product
    norm, summed over the client's LoRA modules, is below ``prune_ratio``; never below 1."""
    if rank <= 1:
        return rank
    last = total = 0.0
    for m in modules.values():
        if not is_lora(m):
            continue
        a, b = m[LORA_A].astype(np.float64), m[LORA_B].astype(np.float64)
        last += float(np.linalg.norm(np.outer(b[:, rank - 1], a[rank - 1])))
        total += float(np.linalg.norm(b[:, :rank] @ a[:rank]))
    if total > 0 and last / total < prune_ratio:
        return rank - 1
    return rank
