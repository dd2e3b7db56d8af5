"""Hypothesis strategies for random memory models, shared by the core tests."""

from __future__ import annotations

from hypothesis import strategies as st

from fedpilot.core.memory import MemoryModel, ModuleCost


@st.composite
def memory_models(draw: st.DrawFn, max_modules: int = 16, max_layers: int = 6) -> MemoryModel:
    layers = draw(st.integers(1, max_layers))
    n = draw(st.integers(1, max_modules))
    modules = tuple(
        ModuleCost(
            name=f"m{i}",
            layer=draw(st.integers(0, layers)),
            param_bytes=draw(st.integers(0, 64)),
            extra_bytes=draw(st.integers(0, 64)),
        )
        for i in range(n)
    )
    activations = tuple(draw(st.integers(0, 100)) for _ in range(layers))
    return MemoryModel(draw(st.integers(0, 100)), activations, modules)


@st.composite
def instances(draw: st.DrawFn, max_modules: int = 16) -> tuple[MemoryModel, int, dict[str, float]]:
    memory = draw(memory_models(max_modules=max_modules))
    budget = draw(st.integers(0, memory.full_cost() + 50))
    values = {
        n: draw(st.floats(0, 1, allow_nan=False, allow_infinity=False)) for n in memory.module_names
    }
    return memory, budget, values
