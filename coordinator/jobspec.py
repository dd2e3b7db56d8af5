"""A federated fine-tuning job as users submit it (REST, CLI, demo).

Validated with pydantic: a bad spec fails with the offending field named, and
bounds keep absurd values (negative rounds, a billion participants) out before
anything is stored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedpilot.core.aggregation import DwaConfig, Merge, Rule
from fedpilot.core.strategies import DEFAULT_STRATEGY, Strategy
from fedpilot.worker.targets import peft_targets

MAX_PARTICIPANTS = 100_000


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rank: Annotated[int, Field(ge=1, le=512, description="LoRA rank r.")] = 8
    alpha: Annotated[float, Field(gt=0, le=4096, description="LoRA scaling numerator.")] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the LoRA path.")] = 0.0
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200)]],
        Field(
            min_length=1,
            max_length=64,
            description="Module names (path suffixes, e.g. q_proj), one regular expression "
            "matched against whole module paths, or all-linear (PEFT's semantics).",
        ),
    ] = ["query", "value"]

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_target(cls, value: object) -> object:
        """A single string (``all-linear``, a pattern) is a one-entry list."""
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _peft_targets(cls, value: list[str]) -> list[str]:
        peft_targets(value)
        return value


class DwaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    eta: Annotated[float, Field(gt=0, le=10, description="Server step.")] = 1.0
    gamma: Annotated[float, Field(ge=0, le=10, description="Boost of under-updated modules.")] = 0.5
    eta_max: Annotated[float, Field(ge=1, le=100, description="Cap of the boost.")] = 2.0
    convex: Annotated[
        bool, Field(description="Cap the step at 1: stay between the old value and the average.")
    ] = True
    coverage: Annotated[
        bool, Field(description="Scale the step by the share of the round's samples that trained")
    ] = True
    staleness: Annotated[
        float,
        Field(
            ge=-4,
            le=4,
            description="Exponent of (1 + rounds the module went untrained) on the step.",
        ),
    ] = 0.0

    def config(self) -> DwaConfig:
        return DwaConfig(
            eta=self.eta,
            gamma=self.gamma,
            eta_max=self.eta_max,
            convex=self.convex,
            coverage=self.coverage,
            staleness=self.staleness,
        )


class AggregationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rule: Rule = Rule.STAGG
    merge: Merge = Merge.FACTORS
    dwa: DwaSpec = DwaSpec()
    ema_decay: Annotated[float, Field(ge=0, lt=1, description="Global-score EMA decay.")] = 0.7
    momentum: Annotated[
        float,
        Field(
            ge=0,
            le=0.95,
            description="Server momentum: each aggregated module also moves by this times "
            "its last global change (heavy-ball FedAvgM; factors merge only).",
        ),
    ] = 0.5
    restart: Annotated[
        bool,
        Field(
            description="Drop a module's momentum for a round when its step points against "
            "its last global change (adaptive gradient restart).",
        ),
    ] = True

    @model_validator(mode="after")
    def _momentum_needs_factors(self) -> AggregationSpec:
        if self.momentum and self.merge is Merge.EXACT:
            raise ValueError(
                "aggregation.momentum needs merge 'factors' (set momentum 0 for exact)"
            )
        return self


class JobSpec(BaseModel):
    """Everything a job needs; defaults make a small Fed-piLot run on the bundled model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Annotated[str, Field(min_length=1, max_length=200)] = "job"
    model: Annotated[
        str, Field(max_length=1000, description="Local HF model directory; empty = bundled MiniLM.")
    ] = ""
    task: Annotated[
        Literal["sequence-classification", "causal-lm", "image-classification"],
        Field(description="What the model learns; decides the model class and data format."),
    ] = "sequence-classification"
    num_labels: Annotated[int, Field(ge=2, le=100_000)] = 2
    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=200)]],
        Field(max_length=100_000, description="Class names in id order (CSV label column)."),
    ] = []
    dataset: Annotated[
        str, Field(max_length=1000, description="Training data name/path resolved on each worker.")
    ] = ""
    eval_dataset: Annotated[
        str,
        Field(
            max_length=1000,
            description="Held-out data evaluated by the coordinator, in the task's format.",
        ),
    ] = ""
    lora: LoraSpec = LoraSpec()
    dtype: Annotated[
        Literal["float32", "float16", "bfloat16"],
        Field(description="Compute dtype of the frozen base (float32 where a device lacks it)."),
    ] = "float32"
    payload_dtype: Annotated[
        Literal["float32", "float16", "bfloat16"],
        Field(description="dtype of uploaded updates; the coordinator aggregates in float32."),
    ] = "float32"
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 5
    min_workers: Annotated[int, Field(ge=1, le=MAX_PARTICIPANTS)] = 1
    participants: Annotated[
        int | None, Field(ge=1, le=MAX_PARTICIPANTS, description="Workers sampled per round.")
    ] = None
    participation_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    quorum: Annotated[
        float, Field(gt=0, le=1, description="Share of participants needed at the deadline.")
    ] = 0.5
    round_deadline_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 600.0
    profile_deadline_s: Annotated[
        float,
        Field(
            gt=0,
            le=7 * 24 * 3600,
            description="Time for a worker's first profile (model download and load included).",
        ),
    ] = 300.0
    local_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    local_epochs: Annotated[int, Field(ge=0, le=1000, description="0 = use local_steps.")] = 0
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    max_seq_len: Annotated[int, Field(ge=8, le=32_768)] = 64
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 5e-4
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    strategy: Strategy = DEFAULT_STRATEGY
    aggregation: AggregationSpec = AggregationSpec()
    ig_lambda: Annotated[float, Field(ge=0, le=1, description="Weight of the local IG score.")] = (
        0.5
    )
    ig_probe_batches: Annotated[int, Field(ge=0, le=1000)] = 2
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """NUL is no character of a name or path (and PostgreSQL text refuses it)."""
        where = _nul_at(data, ())
        if where is not None:
            raise ValueError(f"{'.'.join(where) or 'value'} contains a NUL character")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.participants is not None and self.participants < self.min_workers:
            raise ValueError("participants must be >= min_workers")
        if self.labels:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
            if len(self.labels) < 2:
                raise ValueError("labels must name at least 2 classes")
            self.num_labels = len(self.labels)
        return self


def _nul_at(value: Any, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """Where the first string holding NUL is inside ``value``, if any."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and "\x00" in key:
            return (*path, "<key>")
        found = _nul_at(item, (*path, str(key)))
        if found is not None:
            return found
    return None
