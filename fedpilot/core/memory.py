"""Depth-aware memory model of LoRA training (DESIGN.md section 1).

Training a subset ``S`` of LoRA modules costs::

    cost(S) = M0 + sum_{l >= low(S)} a_l + sum_{m in S} (p_m + e_m),   cost({}) = M0

Layers are numbered ``1..L`` from the input. A module whose ``layer`` is
``HEAD_LAYER`` (0) sits above the last layer (the task head): training only the
head back-propagates through no transformer layer, so it adds no ``a_l``.
Everything here is plain data and arithmetic: workers fill it from
measurements, the coordinator and ``fedpilot plan`` read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HEAD_LAYER = 0
"""``layer`` value of a module above the last transformer layer (e.g. the task head)."""


@dataclass(frozen=True)
class ModuleCost:
    """One trainable module and the bytes that training it adds.

    ``param_bytes`` (``p_m``) covers the LoRA parameters, their gradients and
    optimizer state; ``extra_bytes`` (``e_m``) the activations autograd keeps
    only because this module is trainable.
    """

    name: str
    layer: int
    param_bytes: int
    extra_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("module name must not be empty")
        if self.layer < 0:
            raise ValueError(f"module {self.name!r}: layer must be >= 0, got {self.layer}")
        if self.param_bytes < 0 or self.extra_bytes < 0:
            raise ValueError(f"module {self.name!r}: byte counts must be >= 0")

    @property
    def bytes(self) -> int:
        """``p_m + e_m``: the knapsack weight of this module."""
        return self.param_bytes + self.extra_bytes


@dataclass(frozen=True)
class MemoryModel:
    """Measured memory of one model configuration (model, batch, sequence, dtype, rank).

    ``layer_activation_bytes[i]`` is ``a_l`` for layer ``l = i + 1``.
    """

    base_bytes: int
    layer_activation_bytes: tuple[int, ...]
    modules: tuple[ModuleCost, ...]
    _by_name: dict[str, ModuleCost] = field(init=False, repr=False, compare=False)
    _suffix: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_activation_bytes", tuple(self.layer_activation_bytes))
        object.__setattr__(self, "modules", tuple(self.modules))
        if self.base_bytes < 0:
            raise ValueError("base_bytes must be >= 0")
        if any(a < 0 for a in self.layer_activation_bytes):
            raise ValueError("layer_activation_bytes must all be >= 0")
        n_layers = len(self.layer_activation_bytes)
        by_name: dict[str, ModuleCost] = {}
        for m in self.modules:
            if m.name in by_name:
                raise ValueError(f"duplicate module name {m.name!r}")
            if m.layer > n_layers:
                raise ValueError(
                    f"module {m.name!r} is in layer {m.layer} but only {n_layers} layers "
                    "have activation sizes"
                )
            by_name[m.name] = m
        # suffix[k] = sum_{l >= k} a_l for k = 1..L, suffix[L + 1] = 0 (index 0 unused).
        suffix = [0] * (n_layers + 2)
        for layer in range(n_layers, 0, -1):
            suffix[layer] = suffix[layer + 1] + self.layer_activation_bytes[layer - 1]
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_suffix", tuple(suffix))
        # Hashed once: strategies group a thousand clients by their model per round.
        object.__setattr__(
            self, "_hash", hash((self.base_bytes, self.layer_activation_bytes, self.modules))
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def num_layers(self) -> int:
        return len(self.layer_activation_bytes)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def module(self, name: str) -> ModuleCost:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown module {name!r}") from None

    def depth(self, layer: int) -> int:
        """Position from the input used for ``low(S)``: the head sits above layer L."""
        return self.num_layers + 1 if layer == HEAD_LAYER else layer

    def activation_bytes_from(self, depth: int) -> int:
        """``sum_{l >= depth} a_l``; 0 when ``depth`` is above the last layer."""
        if depth > self.num_layers:
            return 0
        return self._suffix[max(depth, 1)]

    def cost(self, names: Iterable[str]) -> int:
        """Predicted peak bytes of training exactly the modules ``names``."""
        chosen = [self.module(n) for n in set(names)]
        if not chosen:
            return self.base_bytes
        low = min(self.depth(m.layer) for m in chosen)
        return self.base_bytes + self.activation_bytes_from(low) + sum(m.bytes for m in chosen)

    def full_cost(self) -> int:
        """Cost of training every module."""
        return self.cost(self.module_names)


@dataclass(frozen=True)
class WorkerProfile:
    """A worker's measured memory model plus the budget it must stay within."""

    memory: MemoryModel
    budget_bytes: int

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")

    def fits(self, names: Iterable[str]) -> bool:
        return self.memory.cost(names) <= self.budget_bytes

    @property
    def can_participate(self) -> bool:
        """False when even the frozen model (``M0``) exceeds the budget."""
        return self.memory.base_bytes <= self.budget_bytes


def cost(memory: MemoryModel, names: Sequence[str]) -> int:
    """Functional alias of :meth:`MemoryModel.cost`."""
    return memory.cost(names)


def memory_to_json(memory: MemoryModel) -> dict[str, Any]:
    """The ``fedpilot plan`` input format (without ``clients``): how profiles are
    printed, stored and exchanged outside protobuf."""
    return {
        "modules": [
            {
                "name": m.name,
                "layer": m.layer,
                "param_bytes": m.param_bytes,
                "extra_bytes": m.extra_bytes,
            }
            for m in memory.modules
        ],
        "layer_activation_bytes": list(memory.layer_activation_bytes),
        "base_bytes": memory.base_bytes,
    }


def memory_from_json(data: Mapping[str, Any]) -> MemoryModel:
    """Inverse of :func:`memory_to_json`."""
    return MemoryModel(
        base_bytes=int(data["base_bytes"]),
        layer_activation_bytes=tuple(int(a) for a in data["layer_activation_bytes"]),
        modules=tuple(
            ModuleCost(m["name"], int(m["layer"]), int(m["param_bytes"]), int(m["extra_bytes"]))
            for m in data["modules"]
        ),
    )
