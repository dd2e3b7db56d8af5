"""`fedpilot bench quality`: Fed-piLot against ablations and baselines on the real system.

Per partition setting (Dirichlet alpha, or IID) one local cluster of real
processes runs: a coordinator (SQLite, or PostgreSQL when
``FEDPILOT_DATABASE_URL`` is set) and N workers on loopback whose memory
budgets fit about 25%, 50% and 100% of the LoRA modules of a measured profile
(as in ``fedpilot demo``). Every method is one job, submitted after the
previous one finished, to the same coordinator and workers; the job seed, the
data and the initial adapter are the same for all. Workers profile the
configuration once (the first job); later jobs of the same setting start
with copies of those measured profiles, so no method pays for profiling.

The unconstrained upper bound runs last on fresh workers of the same data
whose budgets fit every module, all training every module.

Memory-budget violations are counted from the coordinator's database: a
training task whose predicted peak exceeds its worker's budget, or an update
whose measured peak does.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.core.memory import MemoryModel
from fedpilot.core.partition import dirichlet_partition, iid_partition, pathological_partition
from fedpilot.demo import DEFAULT_DATASET, measure_profile, tier_budgets

if TYPE_CHECKING:
    from fedpilot.sim.engine import ModelCache
    from fedpilot.sim.runners import TurnRunner

CONSTRAINED = "constrained"
UNCONSTRAINED = "unconstrained"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    """What it is: default, paper, fix, ablation, baseline or bound."""
    overrides: Mapping[str, Any]
    budgets: str = CONSTRAINED
    sim: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~fedpilot.sim.SimOptions` fields; a method with any runs on the simulator only."""

    @property
    def sim_only(self) -> bool:
        return bool(self.sim)


def _agg(**kwargs: Any) -> dict[str, Any]:
    return {"aggregation": kwargs}


PAPER_STEP = {"convex": False, "coverage": False}
"""The paper's DWA step (``eta_m`` up to ``eta_max``, no coverage damping)."""

NO_MOMENTUM = {"momentum": 0.0, "restart": False}
"""Methods defined without server momentum (the paper's, the published baselines) pin it off."""

KNAPSACK = {"strategy": "fedpilot"}
"""The IG-Score knapsack, the default strategy until 2026-12-01. The rows defined as
changes to the default before then keep it, so their stored runs stay what they ran."""


def _knapsack(**kwargs: Any) -> dict[str, Any]:
    return {**KNAPSACK, **kwargs}


METHODS: tuple[Method, ...] = (
    Method("fedpilot", "default", {}),
    Method("paper", "paper", _knapsack(**_agg(dwa=PAPER_STEP, **NO_MOMENTUM))),
    # The default's assignment replaced by the knapsack (the default until 2026-12-01);
    # the rows after it change that configuration, one thing each.
    Method("knapsack", "ablation", KNAPSACK),
    Method("no-momentum", "ablation", _knapsack(**_agg(**NO_MOMENTUM))),
    Method("momentum-0.5", "ablation", _knapsack(**_agg(momentum=0.5, restart=False))),
    Method("momentum-0.8-restart", "ablation", _knapsack(**_agg(momentum=0.8, restart=True))),
    Method("momentum-0.8", "ablation", _knapsack(**_agg(momentum=0.8, restart=False))),
    Method("momentum-0.3", "ablation", _knapsack(**_agg(momentum=0.3, restart=False))),
    Method("convex-dwa", "ablation", _knapsack(**_agg(dwa={"coverage": False}))),
    Method("fresh-ig", "fix", KNAPSACK, sim={"fresh_scores": True}),
    Method("forget-scores", "ablation", KNAPSACK, sim={"keep_scores": False}),
    Method("stale-boost", "fix", _knapsack(**_agg(dwa={"staleness": 0.5}))),
    Method("stale-damp", "fix", _knapsack(**_agg(dwa={"staleness": -0.5}))),
    Method("exact-merge", "ablation", _knapsack(**_agg(merge="exact", **NO_MOMENTUM))),
    Method("ig-local-only", "ablation", _knapsack(ig_lambda=1.0)),
    Method("ig-global-only", "ablation", _knapsack(ig_lambda=0.0)),
    Method(
        "no-dwa", "ablation", _knapsack(**_agg(dwa={"gamma": 0.0, **PAPER_STEP}, **NO_MOMENTUM))
    ),
    # Baselines, as published: no server momentum.
    Method(
        "fedra",
        "baseline",
        {"strategy": "fedra", **_agg(dwa={"gamma": 0.0, **PAPER_STEP}, **NO_MOMENTUM)},
    ),
    Method("hetlora", "baseline", {"strategy": "full"}, sim={"rank_baseline": "hetlora"}),
    Method("flexlora", "baseline", {"strategy": "full"}, sim={"rank_baseline": "flexlora"}),
    Method("exclusive", "baseline", {"strategy": "full", **_agg(**NO_MOMENTUM)}),
    Method("uniform", "baseline", {"strategy": "uniform", **_agg(**NO_MOMENTUM)}),
    Method("random", "baseline", {"strategy": "random", **_agg(**NO_MOMENTUM)}),
    Method("top-down", "baseline", {"strategy": "top-down", **_agg(**NO_MOMENTUM)}),
    # FedAvg's rule over the knapsack's assignments, as it ran.
    Method("fedavg", "baseline", _knapsack(**_agg(rule="fedavg", **NO_MOMENTUM))),
    # Server momentum given to baselines: how much of a gain is momentum alone. FedAvgM
    # as published (0.5, no restart), and FedAvg with the default's momentum and restart.
    Method("fedavgm", "baseline", _knapsack(**_agg(rule="fedavg", momentum=0.5, restart=False))),
    Method("fedavgm-restart", "baseline", _knapsack(**_agg(rule="fedavg"))),
    Method(
        "fedra-momentum",
        "baseline",
        {
            "strategy": "fedra",
            **_agg(dwa={"gamma": 0.0, **PAPER_STEP}, momentum=0.5, restart=False),
        },
    ),
    Method("unconstrained", "bound", {"strategy": "full"}, budgets=UNCONSTRAINED),
)
"""Every compared method. ``fedpilot`` is the shipped default (FedRA's random layer
allocation redrawn every round, STAgg with the convex, coverage-damped DWA step,
server momentum 0.5 with adaptive restart, ``factors`` merge); ``knapsack`` is the
same with the IG-Score knapsack (the default until 2026-12-01), and the ablation
and fix rows change that configuration one thing at a time, as they ran. ``paper``
is the paper's method (knapsack, ``eta_m`` up to 2, no damping, no momentum).
``exclusive`` is the ``full`` strategy: only clients that fit every module train.
``fedra`` aggregates per module over its trainers (gamma 0), as FedRA averages
each layer over the clients that trained it. ``fedavg`` is FedAvg's rule over the
knapsack's assignments; ``fedavgm`` and ``fedra-momentum`` are FedAvg and FedRA
with server momentum 0.5 (FedAvgM); ``fedavgm-restart`` is FedAvg with the
default's momentum and restart."""

METHOD_NAMES = tuple(m.name for m in METHODS)
CLUSTER_METHODS = tuple(m.name for m in METHODS if not m.sim_only)
ENGINES = ("sim", "cluster")


@dataclass
class QualityConfig:
    workers: int = 8
    rounds: int = 6
    settings: tuple[str, ...] = ("dirichlet-0.5",)
    methods: tuple[str, ...] = METHOD_NAMES
    dataset: Path = DEFAULT_DATASET
    model: str = ""
    """Local HF model directory; empty = the bundled all-MiniLM-L6-v2."""
    classes: int = 20
    labels: tuple[str, ...] = ()
    """These label names instead of the first ``classes`` (sorted)."""
    per_class: int = 30
    eval_per_class: int = 10
    local_steps: int = 5
    batch_size: int = 16
    max_seq_len: int = 32
    learning_rate: float = 5e-3
    lora_rank: int = 8
    targets: tuple[str, ...] = ("query", "value")
    seed: int = 0
    target_accuracy: float | None = None
    """None = 90% of the best accuracy the unconstrained bound reached (same target for all)."""
    out: Path = Path("./data/bench-quality")
    database_url: str = ""
    round_deadline_s: float = 900.0
    reuse_profiles: bool = True
    engine: str = "sim"
    """``sim``: virtual clients in this process; ``cluster``: real processes over gRPC."""
    seeds: int = 1
    """Seeds per method: ``seed``, ``seed + 1``, ... (partition, initial adapter, sampling)."""
    participants: int | None = None
    """Clients sampled per round; None = every client."""
    probe_examples: int = 16
    """Examples per local IG probe (the worker's default)."""
    eval_max: int = 2000
    """Held-out examples evaluated per round (the coordinator's default cap)."""
    ig_probe_batches: int = 1
    ray_actors: int = 0
    """Simulator only: client turns on this many Ray actors (one torch thread each); 0 = in
    the bench's process."""


def quick(config: QualityConfig) -> QualityConfig:
    """Minutes instead of most of an hour: fewer rounds, steps, classes and examples."""
    return replace(
        config,
        rounds=3,
        local_steps=3,
        classes=min(config.classes, 10),
        per_class=min(config.per_class, 30),
        eval_per_class=min(config.eval_per_class, 10),
    )


def parse_setting(text: str) -> tuple[str, float | None]:
    """``iid``, ``dirichlet-0.5`` or ``0.5``, ``pathological-2`` -> (canonical name, alpha or
    None); a pathological split's number is its classes per client, as a negative alpha."""
    t = text.strip().lower()
    if t == "iid":
        return "iid", None
    if t.startswith("pathological"):
        k = int(t.removeprefix("pathological").lstrip("-") or "2")
        if k < 1:
            raise ValueError(f"classes per client must be >= 1: {text!r}")
        return f"pathological-{k}", float(-k)
    alpha = float(t.removeprefix("dirichlet-").removeprefix("dirichlet"))
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0: {text!r}")
    return f"dirichlet-{alpha:g}", alpha


# -- data ---------------------------------------------------------------------------------


def load_split(
    dataset: Path,
    classes: int,
    per_class: int,
    eval_per_class: int,
    seed: int,
    labels: tuple[str, ...] = (),
) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """Training and held-out examples of the first ``classes`` label names (sorted), or
    of ``labels`` when given (each must be a label of the dataset).

    ``dataset`` is a folder with ``train.csv`` and ``test.csv`` (BANKING77's layout),
    or one CSV with text and label columns, split per class without overlap.
    """
    from fedpilot.worker.data import load_csv

    rng = np.random.default_rng(seed)
    if dataset.is_dir():
        train = load_csv(dataset / "train.csv")
        names = _chosen(train.label_names, classes, labels, dataset)
        test = load_csv(dataset / "test.csv", label_names=names)
        train = load_csv(dataset / "train.csv", label_names=names)
        sources = [(train, per_class, 0), (test, eval_per_class, 0)]
    else:
        data = load_csv(dataset)
        names = _chosen(data.label_names, classes, labels, dataset)
        data = load_csv(dataset, label_names=names)
        sources = [(data, per_class, 0), (data, eval_per_class, per_class)]
    out: list[tuple[list[str], list[int]]] = []
    orders: dict[int, dict[int, np.ndarray]] = {}
    for data, count, skip in sources:
        if id(data) not in orders:
            by_class = {c: np.flatnonzero(np.asarray(data.labels) == c) for c in range(len(names))}
            orders[id(data)] = {c: rng.permutation(idx) for c, idx in by_class.items()}
        texts, labels = [], []
        for c in range(len(names)):
            for i in orders[id(data)][c][skip : skip + count]:
                texts.append(data.texts[int(i)])
                labels.append(c)
        out.append((texts, labels))
    (tr_x, tr_y), (ev_x, ev_y) = out
    if not tr_x or not ev_x:
        raise ValueError(f"{dataset}: no training or held-out examples for {names}")
    return tr_x, tr_y, ev_x, ev_y, names


def _chosen(
    available: list[str], classes: int, labels: tuple[str, ...], dataset: Path
) -> list[str]:
    if not labels:
        return sorted(available)[:classes]
    unknown = sorted(set(labels) - set(available))
    if unknown:
        raise ValueError(f"{dataset}: no label {unknown[0]!r} (labels: {sorted(available)})")
    return list(dict.fromkeys(labels))


def partition(
    labels: list[int], workers: int, alpha: float | None, seed: int, min_size: int
) -> list[np.ndarray]:
    """IID or Dirichlet(alpha) label skew; every worker gets at least ``min_size`` examples
    when a split allows it, else as close to that as possible (never none)."""
    if alpha is None:
        return iid_partition(len(labels), workers, seed)
    if alpha < 0:
        return pathological_partition(labels, workers, int(-alpha), seed)
    for size in sorted({min_size, max(1, min_size // 2), max(1, min_size // 4), 1}, reverse=True):
        try:
            return dirichlet_partition(labels, workers, alpha, seed, min_size=size)
        except ValueError:
            continue
    raise ValueError(f"no Dirichlet({alpha}) split gives {workers} workers an example each")


# -- profile and budgets ------------------------------------------------------------------


def unconstrained_budget(memory: MemoryModel) -> int:
    """Room for every module with a wide margin."""
    return int(memory.full_cost() * 2)


# -- one job -------------------------------------------------------------------------------


def job_spec(
    config: QualityConfig, method: Method, labels: list[str], eval_file: Path
) -> dict[str, Any]:
    from fedpilot.coordinator.jobspec import JobSpec

    spec: dict[str, Any] = {
        "name": f"quality-{method.name}",
        "model": config.model,
        "labels": labels,
        "rounds": config.rounds,
        "min_workers": config.workers,
        "local_steps": config.local_steps,
        "batch_size": config.batch_size,
        "max_seq_len": config.max_seq_len,
        "learning_rate": config.learning_rate,
        "round_deadline_s": config.round_deadline_s,
        "quorum": 0.5,
        "seed": config.seed,
        "lora": {
            "rank": config.lora_rank,
            "alpha": 2 * config.lora_rank,
            "target_modules": list(config.targets),
        },
        "eval_dataset": str(eval_file),
        "ig_probe_batches": config.ig_probe_batches,
    }
    if config.participants is not None:
        spec["participants"] = config.participants
        spec["min_workers"] = min(config.workers, config.participants)
    for key, value in method.overrides.items():
        if isinstance(value, dict):
            merged = dict(spec.get(key, {}))
            for k, v in value.items():
                merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
            spec[key] = merged
        else:
            spec[key] = value
    return JobSpec.model_validate(spec).model_dump(mode="json")


def create_job(cluster: LocalCluster, spec: Mapping[str, Any], profiles_from: str | None) -> str:
    """Insert the job; with ``profiles_from``, in the same transaction, copies of that
    job's measured profiles (same workers, same configuration), so the round driver
    assigns at once instead of profiling again."""
    from fedpilot.coordinator.db.models import Job, Profile

    store = cluster.store
    if profiles_from is None:
        return store.create_job(str(spec["name"]), spec)
    source = store.profiles(profiles_from)
    job_id = str(uuid.uuid4())
    with store.session() as s, s.begin():
        s.add(
            Job(
                id=job_id, name=str(spec["name"]), spec=dict(spec), state="waiting", current_round=0
            )
        )
        s.flush()
        for p in source.values():
            s.add(
                Profile(
                    job_id=job_id,
                    worker_id=p.worker_id,
                    memory=p.memory,
                    tensors=p.tensors,
                    budget_bytes=p.budget_bytes,
                    method=p.method,
                    device=p.device,
                )
            )
    return job_id


def wait_job(
    cluster: LocalCluster,
    job_id: str,
    timeout_s: float,
    on_round: Callable[[int, Mapping[str, Any]], None] | None = None,
) -> str:
    shown: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGTERM):
                raise RuntimeError(
                    f"{name} exited ({proc.returncode}); see {cluster.work_dir / (name + '.log')}"
                )
        job = cluster.store.job(job_id)
        assert job is not None
        if on_round is not None:
            for rnd in cluster.store.rounds(job_id):
                if rnd.number not in shown and "eval_accuracy" in rnd.metrics:
                    shown.add(rnd.number)
                    on_round(rnd.number, rnd.metrics)
        if job.state in ("done", "failed", "cancelled"):
            return job.state if job.state == "done" else f"{job.state}: {job.error}"
        if time.monotonic() > deadline:
            cluster.store.cancel_job(job_id)
            return f"timed out after {timeout_s:.0f} s"
        time.sleep(0.5)


def violations(cluster: LocalCluster, job_id: str, rounds: int) -> dict[str, int]:
    """Budget violations stored for the job: predicted (assigned tasks) and measured (updates)."""
    store = cluster.store
    budgets = {w.id: w.budget_bytes for w in store.workers()}
    predicted = measured = assigned = 0
    for number in range(1, rounds + 1):
        for t in store.tasks(job_id, number, "train"):
            if t.status == "refused":
                continue
            assigned += 1
            predicted += t.predicted_bytes > budgets[t.worker_id]
        for u in store.updates(job_id, number):
            measured += u.measured_peak_bytes > budgets[u.worker_id]
    return {"predicted": predicted, "measured": measured, "assigned_tasks": assigned}


def job_result(cluster: LocalCluster, job_id: str, config: QualityConfig) -> dict[str, Any]:
    store = cluster.store
    rounds = store.rounds(job_id)
    accuracy = [float(r.metrics["eval_accuracy"]) for r in rounds if "eval_accuracy" in r.metrics]
    moved = sum(
        int(r.metrics.get("bytes_in", 0)) + int(r.metrics.get("bytes_out", 0)) for r in rounds
    )
    modules, trained_workers, train_s = [], 0, 0.0
    for r in rounds:
        tasks = [t for t in store.tasks(job_id, r.number, "train") if t.status != "refused"]
        modules += [len(t.modules) for t in tasks]
        trained_workers += len(tasks)
        train_s += sum(u.train_seconds for u in store.updates(job_id, r.number))
    v = violations(cluster, job_id, config.rounds)
    return {
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max(accuracy) if accuracy else None,
        "bytes_moved": moved,
        "violations": v["predicted"] + v["measured"],
        "violations_predicted": v["predicted"],
        "violations_measured": v["measured"],
        "assigned_tasks": v["assigned_tasks"],
        "mean_modules": round(float(np.mean(modules)), 2) if modules else 0.0,
        "workers_per_round": round(trained_workers / max(1, len(rounds)), 2),
        "train_seconds": round(train_s, 1),
    }


# -- a setting: one cluster, every method --------------------------------------------------


@dataclass
class Progress:
    """Where progress lines go (stderr by default); the CLI passes a rich console."""

    print: Callable[[str], None] = field(default=lambda s: None)


def run_setting(
    config: QualityConfig, setting: str, progress: Progress
) -> Iterator[dict[str, Any]]:
    from fedpilot.coordinator.settings import CoordinatorSettings

    name, alpha = parse_setting(setting)
    out = (config.out / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    texts, labels, ev_texts, ev_labels, names = load_split(
        config.dataset,
        config.classes,
        config.per_class,
        config.eval_per_class,
        config.seed,
        config.labels,
    )
    parts = partition(labels, config.workers, alpha, config.seed, min_size=config.batch_size)
    files = [
        write_csv(
            out / "data" / f"worker{i}.csv", [texts[j] for j in p], [names[labels[j]] for j in p]
        )
        for i, p in enumerate(parts)
    ]
    eval_file = write_csv(out / "data" / "eval.csv", ev_texts, [names[y] for y in ev_labels])
    progress.print(
        f"[{name}] {len(texts)} training examples of {len(names)} classes over "
        f"{config.workers} workers (sizes {', '.join(str(len(p)) for p in parts)}); "
        f"{len(ev_texts)} held out"
    )
    memory = measure_profile(config, len(names))
    budgets = tier_budgets(memory, config.workers)
    progress.print(
        f"[{name}] memory: M0 {memory.base_bytes / 2**20:.0f} MiB, all {len(memory.modules)} "
        f"modules {memory.full_cost() / 2**20:.0f} MiB; budgets "
        + ", ".join(f"{b / 2**20:.0f}" for b in budgets)
        + " MiB"
    )
    wanted = [m for m in METHODS if m.name in config.methods]
    heartbeat_timeout = CoordinatorSettings().heartbeat_timeout_s
    job_timeout = config.rounds * 2 * config.round_deadline_s + 600
    cluster = LocalCluster(
        out / f"cluster-{uuid.uuid4().hex[:6]}", db_url=config.database_url, log_level="warning"
    )
    try:
        cluster.start_coordinator()
        for group in (CONSTRAINED, UNCONSTRAINED):
            methods = [m for m in wanted if m.budgets == group]
            if not methods:
                continue
            prefix = "w" if group == CONSTRAINED else "u"
            names_now = _start_workers(cluster, config, memory, budgets, files, group, prefix)
            _wait_alive(cluster, names_now, heartbeat_timeout)
            profiled: str | None = None
            for method in methods:
                spec = job_spec(config, method, names, eval_file)
                start = time.monotonic()
                job_id = create_job(cluster, spec, profiled if config.reuse_profiles else None)

                def shout(number: int, m: Mapping[str, Any], method: Method = method) -> None:
                    progress.print(
                        f"[{name}] {method.name} round {number}: accuracy "
                        f"{m['eval_accuracy']:.3f}, train loss {m['train_loss_before']:.3f} -> "
                        f"{m['train_loss_after']:.3f}, {m['updates']} updates"
                    )

                state = wait_job(cluster, job_id, job_timeout, shout)
                wall = time.monotonic() - start
                if state == "done" and profiled is None:
                    profiled = job_id
                row = {
                    "bench": "quality",
                    "setting": name,
                    "method": method.name,
                    "kind": method.kind,
                    "state": state,
                    "workers": config.workers,
                    "rounds": config.rounds,
                    "wall_s": round(wall, 1),
                    **job_result(cluster, job_id, config),
                }
                progress.print(
                    f"[{name}] {method.name}: {state}, final accuracy "
                    f"{row['final_accuracy']}, {row['violations']} violations, {wall:.0f} s"
                )
                yield row
            for w in names_now:
                cluster.kill(w, signal.SIGTERM)
    finally:
        cluster.stop()


def _start_workers(
    cluster: LocalCluster,
    config: QualityConfig,
    memory: MemoryModel,
    budgets: list[int],
    files: list[Path],
    group: str,
    prefix: str,
) -> list[str]:
    names = []
    for i, path in enumerate(files):
        name = f"{prefix}{i}"
        if group == CONSTRAINED:
            budget, tier = budgets[i], f"{round(100 * _tier(i))}%"
        else:
            budget, tier = unconstrained_budget(memory), "all"
        cluster.start_worker(name, path, budget, {"tier": tier}, threads=1)
        names.append(name)
    return names


def _tier(i: int) -> float:
    from fedpilot.demo import TIERS

    return TIERS[i % len(TIERS)]


def _wait_alive(cluster: LocalCluster, names: list[str], heartbeat_timeout: float) -> None:
    """Until exactly these workers count as alive (earlier ones have timed out)."""
    deadline = time.monotonic() + 300 + heartbeat_timeout
    want = set(names)
    while time.monotonic() < deadline:
        for n in names:
            proc = cluster.processes[n]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{n} exited ({proc.returncode}); see {cluster.work_dir / (n + '.log')}"
                )
        alive = {w.name for w in cluster.store.alive_workers(heartbeat_timeout)}
        if alive == want:
            return
        time.sleep(0.5)
    raise TimeoutError(f"workers {sorted(want)} did not come up alone")


# -- the simulator engine --------------------------------------------------------------------


def client_budgets(memory: MemoryModel, workers: int, method: Method) -> list[int]:
    if method.budgets == UNCONSTRAINED:
        return [unconstrained_budget(memory)] * workers
    return tier_budgets(memory, workers)


def sim_setting(
    config: QualityConfig, setting: str, progress: Progress, cache: Any = None
) -> Iterator[dict[str, Any]]:
    """Every wanted method and seed of one setting on the simulator, a row per run."""
    from fedpilot.sim import ModelCache
    from fedpilot.sim.runners import runner_for

    name, alpha = parse_setting(setting)
    cache = cache or ModelCache()
    wanted = [m for m in METHODS if m.name in config.methods]
    runner = runner_for(config.ray_actors)
    try:
        yield from _sim_seeds(config, name, alpha, wanted, cache, runner, progress)
    finally:
        runner.close()


def _sim_seeds(
    config: QualityConfig,
    name: str,
    alpha: float | None,
    wanted: list[Method],
    cache: ModelCache,
    runner: TurnRunner,
    progress: Progress,
) -> Iterator[dict[str, Any]]:
    from fedpilot.coordinator.evaluation import HeldOutEvaluator
    from fedpilot.coordinator.jobspec import JobSpec
    from fedpilot.sim import SimOptions, Simulation, VirtualClient

    for seed in range(config.seed, config.seed + config.seeds):
        out = (config.out / name / f"seed{seed}").resolve()
        texts, labels, ev_texts, ev_labels, names = load_split(
            config.dataset,
            config.classes,
            config.per_class,
            config.eval_per_class,
            seed,
            config.labels,
        )
        parts = partition(labels, config.workers, alpha, seed, min_size=config.batch_size)
        files = [
            write_csv(
                out / "data" / f"worker{i:03d}.csv",
                [texts[j] for j in p],
                [names[labels[j]] for j in p],
            )
            for i, p in enumerate(parts)
        ]
        eval_file = write_csv(out / "data" / "eval.csv", ev_texts, [names[y] for y in ev_labels])
        evaluator = HeldOutEvaluator(max_examples=config.eval_max)
        progress.print(
            f"[{name} seed {seed}] {len(texts)} training examples of {len(names)} classes over "
            f"{config.workers} clients (sizes {min(map(len, parts))}..{max(map(len, parts))}); "
            f"{min(len(ev_texts), config.eval_max)} held out"
        )
        for method in wanted:
            seeded = replace(config, seed=seed)
            spec = JobSpec.model_validate(job_spec(seeded, method, names, eval_file))
            memory, _ = cache.profile(spec)
            budgets = client_budgets(memory, config.workers, method)
            clients = [
                VirtualClient(f"worker{i:03d}", f, b)
                for i, (f, b) in enumerate(zip(files, budgets, strict=True))
            ]
            options = SimOptions(
                **method.sim,
                probe_examples=config.probe_examples,
                loss_batches=1,
                skip_empty_rounds=True,
            )
            sim = Simulation(
                spec, clients, evaluator=evaluator, options=options, cache=cache, runner=runner
            )
            start = time.monotonic()
            state = "done"

            def shout(r: Any, method: Method = method, seed: int = seed) -> None:
                progress.print(
                    f"[{name} seed {seed}] {method.name} round {r.number}: accuracy "
                    f"{r.eval_accuracy if r.eval_accuracy is None else round(r.eval_accuracy, 3)}, "
                    f"train loss {r.loss_before:.3f} -> {r.loss_after:.3f}, "
                    f"{len(r.modules)} updates, {r.seconds:.1f} s"
                )

            try:
                result = sim.run(shout)
            except RuntimeError as e:
                state, result = f"failed: {e}", None
            wall = time.monotonic() - start
            row = {
                "bench": "quality",
                "engine": "sim",
                "setting": name,
                "method": method.name,
                "kind": method.kind,
                "seed": seed,
                "state": state,
                "workers": config.workers,
                "rounds": config.rounds,
                "classes": len(names),
                **({"labels": names} if config.labels else {}),
                "wall_s": round(wall, 1),
                **sim_result(result),
            }
            progress.print(
                f"[{name} seed {seed}] {method.name}: {state}, final accuracy "
                f"{row['final_accuracy']}, best {row['best_accuracy']}, {wall:.0f} s"
            )
            yield row


def sim_result(result: Any) -> dict[str, Any]:
    if result is None:
        return {
            "accuracy": [],
            "final_accuracy": None,
            "best_accuracy": None,
            "bytes_moved": 0,
            "violations": 0,
            "violations_predicted": 0,
            "violations_measured": 0,
            "assigned_tasks": 0,
            "mean_modules": 0.0,
            "workers_per_round": 0.0,
            "train_seconds": 0.0,
            "train_loss": [],
            "empty_rounds": 0,
        }
    acc = result.accuracy
    modules = [len(m) for r in result.rounds for m in r.modules.values()]
    tasks = sum(len(r.modules) for r in result.rounds)
    return {
        "accuracy": [round(a, 5) for a in acc],
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "bytes_moved": result.bytes_moved,
        "violations": result.violations_predicted + result.violations_measured,
        "violations_predicted": result.violations_predicted,
        "violations_measured": result.violations_measured,
        "assigned_tasks": tasks,
        "empty_rounds": sum(not r.modules for r in result.rounds),
        "mean_modules": round(float(np.mean(modules)), 2) if modules else 0.0,
        "workers_per_round": round(tasks / max(1, len(result.rounds)), 2),
        "train_seconds": round(sum(r.seconds for r in result.rounds), 1),
        "train_loss": [[round(r.loss_before, 5), round(r.loss_after, 5)] for r in result.rounds],
    }


# -- the whole run ---------------------------------------------------------------------------


def finish(rows: list[dict[str, Any]], target: float | None) -> float:
    """Fill in ``rounds_to_target`` for every row; returns the target used."""
    if target is None:
        bounds = [
            r["best_accuracy"]
            for r in rows
            if r["method"] == "unconstrained" and r["best_accuracy"] is not None
        ]
        best = max(bounds) if bounds else max((r["best_accuracy"] or 0.0) for r in rows)
        target = round(0.9 * best, 4)
    for r in rows:
        hit = [i + 1 for i, a in enumerate(r["accuracy"]) if a >= target]
        r["target_accuracy"] = target
        r["rounds_to_target"] = hit[0] if hit else None
    return target


def _check(config: QualityConfig) -> None:
    if not (config.dataset.is_file() or (config.dataset / "train.csv").is_file()):
        raise FileNotFoundError(
            f"{config.dataset}: neither a CSV nor a folder with train.csv/test.csv "
            "(set FEDPILOT_BANKING77 or pass --dataset)"
        )
    if config.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {config.engine!r}")
    if config.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {config.seeds}")
    unknown = set(config.methods) - set(METHOD_NAMES)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHOD_NAMES)}")
    if config.engine == "cluster":
        sim_only = sorted(set(config.methods) - set(CLUSTER_METHODS))
        if sim_only:
            raise ValueError(f"methods {sim_only} run on the simulator only (--engine sim)")


def rows_of(config: QualityConfig, progress: Progress) -> Iterator[dict[str, Any]]:
    """Every run of the configuration, as it finishes."""
    if config.engine == "sim":
        from fedpilot.sim import ModelCache

        cache = ModelCache()
        for setting in config.settings:
            yield from sim_setting(config, setting, progress, cache)
        return
    for setting in config.settings:
        for seed in range(config.seed, config.seed + config.seeds):
            for row in run_setting(replace(config, seed=seed), setting, progress):
                yield {**row, "engine": "cluster", "seed": seed}


def run(config: QualityConfig, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run, append each finished run to ``runs.jsonl`` (usable while the rest runs), then
    write ``results.json``, ``results.md`` and ``accuracy.png``."""
    progress = progress or Progress()
    _check(config)
    config.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with (config.out / "runs.jsonl").open("a", encoding="utf-8") as log:
        for row in rows_of(config, progress):
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
    write_reports(rows, config)
    return rows


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Finished runs from ``runs.jsonl`` files (e.g. shards of a grid, or one cut short)."""
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON run record ({e})") from e
    return rows


def write_reports(rows: list[dict[str, Any]], config: QualityConfig) -> float:
    """``results.json``, ``results.md`` and ``accuracy.png`` from finished runs."""
    from fedpilot.bench.stats import as_json, summarise

    target = finish(rows, config.target_accuracy)
    summary = summarise(rows)
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "target_accuracy": target,
        "summary": [as_json(s) for s in summary],
        "results": rows,
    }
    (config.out / "results.json").write_text(json.dumps(report, indent=2))
    (config.out / "results.md").write_text(markdown(rows, target, config))
    plot(rows, config.out / "accuracy.png")
    return target


# -- reporting ---------------------------------------------------------------------------------

COLUMNS = (
    "setting",
    "seed",
    "method",
    "kind",
    "final acc",
    "best acc",
    "rounds to target",
    "MB moved",
    "wall s",
    "mean modules",
    "violations",
)


def cells(r: Mapping[str, Any]) -> list[str]:
    def acc(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    return [
        r["setting"],
        str(r.get("seed", "-")),
        r["method"] if r["state"] == "done" else f"{r['method']} ({r['state']})",
        r["kind"],
        acc(r["final_accuracy"]),
        acc(r["best_accuracy"]),
        "-" if r["rounds_to_target"] is None else str(r["rounds_to_target"]),
        f"{r['bytes_moved'] / 1e6:.1f}",
        f"{r['wall_s']:.0f}",
        f"{r['mean_modules']:.1f}",
        str(r["violations"]),
    ]


SUMMARY_COLUMNS = (
    "setting",
    "method",
    "kind",
    "seeds",
    "final acc (95% CI)",
    "best acc (95% CI)",
    "final - fedpilot (95% CI)",
    "p",
    "violations",
)


def ordered_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed summary, settings in first-run order and methods in :data:`METHODS` order."""
    from fedpilot.bench.stats import summarise

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    rank = {name: i for i, name in enumerate(METHOD_NAMES)}
    return sorted(
        summarise(rows),
        key=lambda e: (settings.index(e["setting"]), rank.get(e["method"], len(rank))),
    )


def summary_cells(s: Mapping[str, Any]) -> list[str]:
    vs = s["vs_reference"]
    diff, p = "-", "-"
    if vs is not None:
        diff = vs.diff.text() + (" *" if vs.diff.excludes_zero else "")
        p = "-" if vs.p_value != vs.p_value else f"{vs.p_value:.3f}"
    return [
        s["setting"],
        s["method"],
        s["kind"],
        str(s["seeds"]),
        s["final"].text(),
        s["best"].text(),
        diff,
        p,
        str(s["violations"]),
    ]


def markdown(rows: list[dict[str, Any]], target: float, config: QualityConfig) -> str:
    from fedpilot.bench.stats import above_bound, learned, still_rising

    summary = ordered_summary(rows)
    classes = int(rows[0].get("classes", config.classes)) if rows else config.classes
    chance = 1.0 / max(2, classes)
    first = rows[0] if rows else {}
    engines = ", ".join(sorted({str(r.get("engine", config.engine)) for r in rows}))
    seeds = len({r.get("seed", config.seed) for r in rows}) or config.seeds
    lines = [
        f"# fedpilot bench quality ({engines or config.engine} engine, "
        f"{first.get('workers', config.workers)} clients, "
        f"{first.get('workers_per_round', config.participants or config.workers)} trained "
        f"per round, {first.get('rounds', config.rounds)} rounds, {classes} classes, "
        f"{seeds} seeds)",
        "",
        "Mean over seeds with the 95% t-interval; the difference to fedpilot is paired by seed "
        "(* = interval excludes 0; p from the paired t-test).",
        "",
    ]
    for setting in dict.fromkeys(s["setting"] for s in summary):
        if not learned(summary, setting, chance):
            lines.append(
                f"**{setting}: the unconstrained bound did not clearly beat chance "
                f"({chance:.3f}); its methods are not ranked.**"
            )
            lines.append("")
        rising = still_rising(rows, setting)
        if rising is not None:
            lines += [
                f"{setting}: the unconstrained bound was still rising (+{rising:.3f} over its "
                "last 3 rounds): more rounds would change the numbers.",
                "",
            ]
        over = above_bound(summary, setting)
        if over:
            lines += [
                f"{setting}: above the unconstrained bound on average: {', '.join(over)} "
                "(the bound trains every module on every client, but only in expectation "
                "is it best).",
                "",
            ]
    lines += [
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "| " + " | ".join("---" for _ in SUMMARY_COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(summary_cells(s)) + " |" for s in summary]
    lines += [
        "",
        f"Runs (target accuracy for 'rounds to target': {target:.3f}):",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    lines += ["", "Accuracy per round:", ""]
    for r in rows:
        lines.append(
            f"- {r['setting']} seed {r.get('seed', config.seed)} {r['method']}: "
            + ", ".join(f"{a:.3f}" for a in r["accuracy"])
        )
    return "\n".join(lines) + "\n"


def rich_table(rows: list[dict[str, Any]], target: float) -> Any:
    from rich.table import Table

    table = Table(title=f"bench quality (target accuracy {target:.3f})")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 4 else "right")
    for r in rows:
        table.add_row(*cells(r))
    return table


def rich_summary(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="mean over seeds (95% CI); difference to fedpilot paired by seed")
    for i, col in enumerate(SUMMARY_COLUMNS):
        table.add_column(col, justify="left" if i < 3 else "right")
    for s in ordered_summary(rows):
        table.add_row(*summary_cells(s))
    return table


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean accuracy per round over seeds, with the 95% t-interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpilot.bench.stats import t_half_width

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    styles = {
        "default": "-",
        "paper": "-",
        "fix": "-",
        "ablation": "--",
        "baseline": ":",
        "bound": "-.",
    }
    for ax, setting in zip(axes[0], settings, strict=True):
        mine = [r for r in rows if r["setting"] == setting and r["accuracy"]]
        for method in dict.fromkeys(r["method"] for r in mine):
            runs = [r for r in mine if r["method"] == method]
            length = min(len(r["accuracy"]) for r in runs)
            curves = np.array([r["accuracy"][:length] for r in runs])
            mean = curves.mean(axis=0)
            xs = np.arange(1, length + 1)
            kind = runs[0]["kind"]
            (line,) = ax.plot(
                xs,
                mean,
                styles.get(kind, "-"),
                marker="o",
                markersize=3,
                linewidth=2.5 if kind == "default" else 1.2,
                label=f"{method} (n={len(runs)})",
            )
            if len(runs) > 1:
                half = np.array([t_half_width(curves[:, i].tolist()) for i in range(length)])
                ax.fill_between(xs, mean - half, mean + half, color=line.get_color(), alpha=0.15)
        ax.set_title(setting)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out accuracy (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
