"""Conversions between fedpilot.v1 messages and core data types."""

from __future__ import annotations

from fedpilot.core.memory import MemoryModel, ModuleCost
from fedpilot.v1 import profile_pb2


def memory_to_proto(
    memory: MemoryModel, budget_bytes: int, **fields: object
) -> profile_pb2.MemoryProfile:
    return profile_pb2.MemoryProfile(
        base_bytes=memory.base_bytes,
        layer_activation_bytes=list(memory.layer_activation_bytes),
        modules=[
            profile_pb2.ModuleCost(
                name=m.name, layer=m.layer, param_bytes=m.param_bytes, extra_bytes=m.extra_bytes
            )
            for m in memory.modules
        ],
        budget_bytes=budget_bytes,
        **fields,  # type: ignore[arg-type]
    )


def memory_from_proto(msg: profile_pb2.MemoryProfile) -> MemoryModel:
    """Raises ValueError naming the problem for an inconsistent profile."""
    return MemoryModel(
        base_bytes=msg.base_bytes,
        layer_activation_bytes=tuple(msg.layer_activation_bytes),
        modules=tuple(
            ModuleCost(m.name, m.layer, m.param_bytes, m.extra_bytes) for m in msg.modules
        ),
    )
