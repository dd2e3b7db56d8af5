"""N virtual clients in one process, on the code the services run.

One model is loaded per configuration and kept; each virtual client's turn
loads the global adapter into it (:func:`~fedpilot.worker.model.load_module_state`),
probes local IG-Scores, trains its assigned modules and reads them back, exactly
the calls :class:`~fedpilot.worker.service.WorkerService` makes after a download.
Participant sampling, IG-Score mixing and assignment are
:mod:`fedpilot.core.round_plan`, aggregation is :class:`~fedpilot.core.aggregation.Aggregator`
in :func:`~fedpilot.core.round_plan.fixed_order`, evaluation is the coordinator's
:class:`~fedpilot.coordinator.evaluation.HeldOutEvaluator`: the same functions the
round driver calls. Same seed and memory profiles, same global adapter as a cluster.

Clients run one after another by default. To spread them over cores, GPUs or
machines, a :class:`~fedpilot.sim.runners.RayActors` runner hands each client's
turn (load adapter, probe, train, read back: :func:`client_turn`) to Ray actors,
one per device, each holding its own :class:`ModelCache`; the round stays here,
and updates are folded in the same fixed order whatever order they return in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.aggregation import Aggregator, ClientUpdate
from fedpilot.core.hetero_rank import (
    RankedUpdate,
    aggregate_flexlora,
    aggregate_hetlora,
    prune_rank,
    rank_for_budget,
    rank_memory,
    truncate_all,
)
from fedpilot.core.ig_score import ModuleStats
from fedpilot.core.initial import initial_adapter
from fedpilot.core.memory import MemoryModel, WorkerProfile
from fedpilot.core.round_plan import (
    Participant,
    fixed_order,
    latest_scores,
    plan_assignments,
    sample_participants,
)
from fedpilot.sim.runners import InProcess, Turn, TurnRunner

Adapter = dict[str, dict[str, np.ndarray]]
TurnResult = tuple[dict[str, dict[str, np.ndarray]], Any, dict[str, float]]
"""A turn's trained modules, the worker's ``TrainResult`` and its local IG-Scores."""
Evaluator = Callable[[JobSpec, Mapping[str, Mapping[str, np.ndarray]]], dict[str, float]]

RANK_BASELINES = ("hetlora", "flexlora")


@dataclass(frozen=True)
class VirtualClient:
    """One simulated worker: a name (its stable key), its data file and its memory budget."""

    name: str
    data: Path
    budget_bytes: int


@dataclass(frozen=True)
class SimOptions:
    """Choices the job spec does not carry: score timing and the rank-heterogeneous baselines."""

    fresh_scores: bool = False
    """Probe each participant on the adapter it is about to train, before assigning the
    round (a cluster worker probes after its download, so its scores assign the next round)."""
    keep_scores: bool = True
    """A client that skipped rounds keeps its last reported scores (False: only the
    previous round's uploads count, as the coordinator once did)."""
    rank_baseline: str | None = None
    """``hetlora`` or ``flexlora``: every module at a per-client rank instead of a module set."""
    prune_ratio: float = 0.05
    """HetLoRA's self-pruning threshold."""
    probe_examples: int = 16
    """Examples per local IG probe (the worker's ``probe_examples``)."""
    loss_batches: int | None = None
    """Batches for the reported local loss before/after (None: all, as the worker)."""
    measure_peak: bool = False
    """Measure each client's training peak (the worker does; costs one profiled step)."""
    skip_empty_rounds: bool = False
    """A round whose sampled clients can train nothing keeps the global adapter and goes
    on (Exclusive when no full-budget client was drawn). False: the run fails, as a
    coordinator job does."""

    def __post_init__(self) -> None:
        if self.rank_baseline is not None and self.rank_baseline not in RANK_BASELINES:
            raise ValueError(f"rank_baseline must be one of {RANK_BASELINES}")


@dataclass
class RoundRecord:
    number: int
    participants: list[str]
    modules: dict[str, list[str]]
    """Trained modules per client that trained (rank baselines: every module)."""
    ranks: dict[str, int]
    predicted_bytes: dict[str, int]
    measured_peak_bytes: dict[str, int]
    num_samples: dict[str, int]
    loss_before: float
    loss_after: float
    seconds: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None


@dataclass
class SimResult:
    rounds: list[RoundRecord]
    adapter: Adapter
    memory: MemoryModel
    violations_predicted: int = 0
    violations_measured: int = 0
    bytes_moved: int = 0

    @property
    def accuracy(self) -> list[float]:
        return [r.eval_accuracy for r in self.rounds if r.eval_accuracy is not None]


@dataclass
class ModelCache:
    """The model, tokenised client data and measured profile, kept across simulations.

    A bench runs many methods and seeds on one configuration: it loads the model
    and tokenises each file once.
    """

    models: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    batches: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)
    profiles: dict[str, tuple[MemoryModel, dict[str, dict[str, list[int]]]]] = field(
        default_factory=dict
    )

    def model(self, spec: JobSpec) -> tuple[Any, Any]:
        """(ModelSpec, PEFT model) of the job, as a worker builds it from its task config."""
        from fedpilot.coordinator.export import model_spec
        from fedpilot.worker.model import load_model

        mspec = model_spec(spec)
        key = repr(mspec)
        if key not in self.models:
            self.models[key] = (mspec, load_model(mspec, seed=spec.seed))
        return self.models[key]

    def profile(self, spec: JobSpec) -> tuple[MemoryModel, dict[str, dict[str, list[int]]]]:
        """The memory model a worker measures for the job, and the adapter's tensor shapes."""
        from fedpilot.worker.model import get_module_state
        from fedpilot.worker.profiling import dummy_batch, profile_memory

        mspec, model = self.model(spec)
        key = repr(mspec)
        if key not in self.profiles:
            memory = profile_memory(model, dummy_batch(model, mspec.batch_size, mspec.max_seq_len))
            shapes = {
                m: {p: list(x.shape) for p, x in parts.items()}
                for m, parts in get_module_state(model).items()
            }
            self.profiles[key] = (memory, shapes)
        return self.profiles[key]

    def client_batches(self, spec: JobSpec, data: Path) -> list[Any]:
        """A client's batches, read and tokenised as the worker does."""
        from fedpilot.worker.data import load_data, make_batches
        from fedpilot.worker.model import load_tokenizer

        mspec, _ = self.model(spec)
        key = (str(data), tuple(spec.labels), spec.num_labels, spec.batch_size, spec.max_seq_len)
        if key not in self.batches:
            dataset = load_data(data, label_names=spec.labels or None, num_labels=spec.num_labels)
            self.batches[key] = make_batches(
                dataset,
                load_tokenizer(mspec),
                batch_size=spec.batch_size,
                max_seq_len=spec.max_seq_len,
            )
        return self.batches[key]


def client_turn(
    cache: ModelCache,
    spec: JobSpec,
    options: SimOptions,
    client: VirtualClient,
    adapter: Adapter,
    modules: Sequence[str],
    number: int,
    probe: bool = True,
) -> TurnResult:
    """Load ``adapter``, probe local scores, train ``modules``, read them back: the
    worker's calls after a download, on ``cache``'s model."""
    from fedpilot.worker.model import get_module_state, load_module_state
    from fedpilot.worker.training import train

    _, model = cache.model(spec)
    batches = cache.client_batches(spec, client.data)
    load_module_state(model, adapter)
    scores: dict[str, float] = {}
    if probe and spec.ig_probe_batches and not options.fresh_scores:
        scores = _probe_scores(model, batches, spec, options)
    result = train(
        model,
        list(modules),
        batches,
        steps=spec.local_steps if not spec.local_epochs else None,
        epochs=max(1, spec.local_epochs),
        lr=spec.learning_rate,
        weight_decay=spec.weight_decay,
        seed=int(spec.seed) + int(number),
        measure_peak=options.measure_peak,
        loss_batches=options.loss_batches,
    )
    return get_module_state(model, list(modules)), result, scores


def _probe_scores(
    model: Any, batches: list[Any], spec: JobSpec, options: SimOptions
) -> dict[str, float]:
    """The worker's local IG probe on the adapter loaded in ``model``."""
    from fedpilot.worker.scoring import local_ig_scores

    return local_ig_scores(
        model, batches[: spec.ig_probe_batches], max_examples=options.probe_examples
    )


def _nbytes(modules: Mapping[str, Mapping[str, np.ndarray]]) -> int:
    return sum(x.nbytes for parts in modules.values() for x in parts.values())


class Simulation:
    """One job run by virtual clients; :meth:`run` returns every round's record."""

    def __init__(
        self,
        spec: JobSpec,
        clients: Sequence[VirtualClient],
        *,
        evaluator: Evaluator | None = None,
        options: SimOptions | None = None,
        cache: ModelCache | None = None,
        memory: MemoryModel | None = None,
        runner: TurnRunner | None = None,
    ) -> None:
        if not clients:
            raise ValueError("a simulation needs at least one client")
        names = [c.name for c in clients]
        if len(set(names)) != len(names):
            raise ValueError("client names must be distinct (they order the aggregation)")
        if len(clients) < spec.min_workers:
            raise ValueError(
                f"{len(clients)} clients, the job needs min_workers={spec.min_workers}"
            )
        self.spec = spec
        self.clients = sorted(clients, key=lambda c: c.name)
        self.evaluator = evaluator
        self.options = options or SimOptions()
        self.cache = cache or ModelCache()
        self.runner = runner or InProcess()
        """Where client turns run (:mod:`fedpilot.sim.runners`)."""
        measured, self.shapes = self.cache.profile(spec)
        self.memory = memory or measured

    def probe(self, client: VirtualClient, adapter: Adapter) -> dict[str, float]:
        """Local IG-Scores of ``client`` on ``adapter`` (the fresh-scores variant)."""
        from fedpilot.worker.model import load_module_state

        _, model = self.cache.model(self.spec)
        batches = self.cache.client_batches(self.spec, client.data)
        load_module_state(model, adapter)
        return _probe_scores(model, batches, self.spec, self.options)

    # -- the round ------------------------------------------------------------------------

    def _participants(self, number: int) -> list[VirtualClient]:
        spec = self.spec
        n = len(self.clients)
        want = spec.participants or math.ceil(spec.participation_fraction * n)
        want = min(n, max(want, spec.min_workers))
        return sample_participants(self.clients, want, spec.seed, number)

    def run(self, on_round: Callable[[RoundRecord], None] | None = None) -> SimResult:
        spec = self.spec
        adapter: Adapter = initial_adapter(self.shapes, seed=spec.seed)
        stats: dict[str, ModuleStats] = {}
        history: list[dict[str, Mapping[str, float]]] = []
        ranks: dict[str, int] = {}
        previous: Adapter | None = None  # the version before ``adapter``: server momentum
        result = SimResult([], adapter, self.memory)
        for number in range(1, spec.rounds + 1):
            start = time.perf_counter()
            people = self._participants(number)
            if self.options.rank_baseline:
                record, adapter = self._rank_round(number, people, adapter, ranks, result)
            else:
                record, merged, stats = self._module_round(
                    number, people, adapter, previous, stats, history, result
                )
                if merged is not adapter:
                    previous, adapter = adapter, merged
            if self.evaluator is not None and spec.eval_dataset:
                scores = self.evaluator(spec, adapter)
                record.eval_loss = scores["eval_loss"]
                record.eval_accuracy = scores["eval_accuracy"]
            record.seconds = time.perf_counter() - start
            result.rounds.append(record)
            if on_round is not None:
                on_round(record)
        result.adapter = adapter
        return result

    def _profile_of(self, client: VirtualClient) -> WorkerProfile:
        return WorkerProfile(self.memory, client.budget_bytes)

    def _module_round(
        self,
        number: int,
        people: list[VirtualClient],
        adapter: Adapter,
        previous: Adapter | None,
        stats: dict[str, ModuleStats],
        history: list[dict[str, Mapping[str, float]]],
        result: SimResult,
    ) -> tuple[RoundRecord, Adapter, dict[str, ModuleStats]]:
        spec, options = self.spec, self.options
        if options.fresh_scores and spec.ig_probe_batches:
            history.append({c.name: self.probe(c, adapter) for c in people})
        known = latest_scores(history if options.keep_scores else history[-1:])
        assignments = plan_assignments(
            [Participant(c.name, self._profile_of(c), known.get(c.name, {})) for c in people],
            stats,
            strategy=spec.strategy,
            ig_lambda=spec.ig_lambda,
            seed=spec.seed,
            number=number,
        )
        by_name = {c.name: c for c in people}
        record = RoundRecord(number, [c.name for c in people], {}, {}, {}, {}, {}, 0.0, 0.0, 0.0)
        updates, uploaded = [], {}
        weighted = [0.0, 0.0, 0]
        chosen = [a for a in assignments if a.feasible and a.modules]
        turns = [Turn(by_name[a.client], adapter, tuple(a.modules)) for a in chosen]
        for a, (modules, trained, scores) in zip(
            chosen, self.runner.run(self, turns, number), strict=True
        ):
            client = by_name[a.client]
            result.violations_predicted += a.predicted_bytes > client.budget_bytes
            if scores:
                uploaded[client.name] = scores
            result.violations_measured += trained.peak_bytes > client.budget_bytes
            result.bytes_moved += _nbytes(adapter) + _nbytes(modules)
            updates.append(ClientUpdate(client.name, trained.num_samples, modules))
            record.modules[client.name] = list(a.modules)
            record.predicted_bytes[client.name] = a.predicted_bytes
            record.measured_peak_bytes[client.name] = trained.peak_bytes
            record.num_samples[client.name] = trained.num_samples
            weighted[0] += trained.loss_before * trained.num_samples
            weighted[1] += trained.loss_after * trained.num_samples
            weighted[2] += trained.num_samples
        if not updates:
            if options.skip_empty_rounds:
                return record, adapter, stats
            raise RuntimeError(f"round {number}: no client could train any module")
        if not options.fresh_scores:
            history.append(uploaded)
        agg = spec.aggregation
        aggregator = Aggregator(
            adapter,
            stats,
            number,
            rule=agg.rule,
            merge=agg.merge,
            dwa=agg.dwa.config(),
            ema_decay=agg.ema_decay,
            momentum=agg.momentum,
            previous=previous,
            restart=agg.restart,
        )
        for u in fixed_order(updates, key=lambda u: u.client):
            aggregator.add(u)
        merged = aggregator.result()
        record.loss_before = weighted[0] / max(1, weighted[2])
        record.loss_after = weighted[1] / max(1, weighted[2])
        return record, merged.modules, merged.stats

    def _rank_round(
        self,
        number: int,
        people: list[VirtualClient],
        adapter: Adapter,
        ranks: dict[str, int],
        result: SimResult,
    ) -> tuple[RoundRecord, Adapter]:
        spec, options = self.spec, self.options
        full_rank = spec.lora.rank
        names = list(self.memory.module_names)
        record = RoundRecord(number, [c.name for c in people], {}, {}, {}, {}, {}, 0.0, 0.0, 0.0)
        updates: list[RankedUpdate] = []
        weighted = [0.0, 0.0, 0]
        chosen: list[tuple[VirtualClient, int]] = []
        starts: dict[int, Adapter] = {}  # one truncated adapter per rank
        for client in people:
            rank = ranks.setdefault(
                client.name, rank_for_budget(self.memory, client.budget_bytes, full_rank)
            )
            if rank == 0:
                continue  # cannot train every module even at rank 1: sits out
            if rank not in starts:
                starts[rank] = truncate_all(adapter, rank)
            chosen.append((client, rank))
        turns = [Turn(c, starts[r], tuple(names), probe=False) for c, r in chosen]
        for (client, rank), (modules, trained, _) in zip(
            chosen, self.runner.run(self, turns, number), strict=True
        ):
            predicted = rank_memory(self.memory, rank, full_rank).full_cost()
            result.violations_predicted += predicted > client.budget_bytes
            result.violations_measured += trained.peak_bytes > client.budget_bytes
            result.bytes_moved += 2 * _nbytes(modules)
            updates.append(RankedUpdate(client.name, trained.num_samples, rank, modules))
            if options.rank_baseline == "hetlora":
                ranks[client.name] = prune_rank(modules, rank, options.prune_ratio)
            record.modules[client.name] = names
            record.ranks[client.name] = rank
            record.predicted_bytes[client.name] = predicted
            record.measured_peak_bytes[client.name] = trained.peak_bytes
            record.num_samples[client.name] = trained.num_samples
            weighted[0] += trained.loss_before * trained.num_samples
            weighted[1] += trained.loss_after * trained.num_samples
            weighted[2] += trained.num_samples
        if not updates:
            if options.skip_empty_rounds:
                return record, adapter
            raise RuntimeError(f"round {number}: no client can train every module at rank 1")
        ordered = fixed_order(updates, key=lambda u: u.client)
        merge = aggregate_hetlora if options.rank_baseline == "hetlora" else aggregate_flexlora
        record.loss_before = weighted[0] / max(1, weighted[2])
        record.loss_after = weighted[1] / max(1, weighted[2])
        return record, merge(adapter, ordered)
