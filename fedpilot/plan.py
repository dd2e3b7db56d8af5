"""`fedpilot plan`: what each client would train, from a JSON description.

The file format (all byte counts are integers)::

    {"modules": [{"name": str, "layer": int, "param_bytes": int, "extra_bytes": int}],
     "layer_activation_bytes": [a_1, ..., a_L],
     "base_bytes": M0,
     "clients": [{"name": str, "budget_bytes": int, "scores": {module: float}}],
     "strategy": "fedpilot" | "random" | "top-down" | "uniform" | "full",
     "seed": 0}

``layer`` counts from 1 at the input; ``layer: 0`` marks a module above the
last layer, such as the classification head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedpilot.core.memory import MemoryModel, ModuleCost, WorkerProfile
from fedpilot.core.strategies import Assignment, Client, Strategy, assign

NonNegInt = Annotated[int, Field(ge=0, strict=True)]


class PlanError(ValueError):
    """The plan file is unreadable or invalid; the message names the field."""


class ModuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    layer: NonNegInt
    param_bytes: NonNegInt
    extra_bytes: NonNegInt = 0


class ClientSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    budget_bytes: NonNegInt
    scores: dict[str, float] = Field(default_factory=dict)


class PlanSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modules: Annotated[list[ModuleSpec], Field(min_length=1)]
    layer_activation_bytes: list[NonNegInt]
    base_bytes: NonNegInt
    clients: Annotated[list[ClientSpec], Field(min_length=1)]
    strategy: Strategy = Strategy.FEDPILOT
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> PlanSpec:
        names = [m.name for m in self.modules]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"modules.{i}.name: duplicate module {name!r}")
            seen.add(name)
        for i, m in enumerate(self.modules):
            if m.layer > len(self.layer_activation_bytes):
                raise ValueError(
                    f"modules.{i}.layer: {m.layer} exceeds the {len(self.layer_activation_bytes)} "
                    "layers in layer_activation_bytes"
                )
        for i, c in enumerate(self.clients):
            for key, value in c.scores.items():
                if key not in seen:
                    raise ValueError(f"clients.{i}.scores: unknown module {key!r}")
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError(f"clients.{i}.scores.{key}: must be finite")
        return self


def load_plan(path: Path) -> PlanSpec:
    try:
        raw: Any = json.loads(path.read_text())
    except OSError as e:
        raise PlanError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON: {e}") from e
    try:
        return PlanSpec.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{where}: {err['msg']}")
        raise PlanError(f"{path}: invalid plan:\n  " + "\n  ".join(lines)) from e


def run_plan(spec: PlanSpec) -> list[Assignment]:
    memory = MemoryModel(
        base_bytes=spec.base_bytes,
        layer_activation_bytes=tuple(spec.layer_activation_bytes),
        modules=tuple(
            ModuleCost(m.name, m.layer, m.param_bytes, m.extra_bytes) for m in spec.modules
        ),
    )
    clients = [
        Client(c.name, WorkerProfile(memory, c.budget_bytes), c.scores) for c in spec.clients
    ]
    return assign(clients, spec.strategy, seed=spec.seed)


def plan_json(assignments: list[Assignment]) -> dict[str, Any]:
    out = []
    for a in assignments:
        row: dict[str, Any] = {
            "name": a.client,
            "modules": list(a.modules),
            "predicted_bytes": a.predicted_bytes,
            "value": a.value,
            "feasible": a.feasible,
        }
        if a.reason:
            row["reason"] = a.reason
        out.append(row)
    return {"clients": out}
