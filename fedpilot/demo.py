"""`fedpilot demo`: a real federated fine-tuning run on this machine.

One coordinator and N workers as separate processes talking gRPC on
loopback; memory budgets in tiers derived from a measured profile (so the
federation is heterogeneous on any machine); non-IID (Dirichlet) partitions of
a real dataset; the pretrained all-MiniLM-L6-v2 with LoRA; per-round progress;
a closing table and a standard PEFT adapter on disk.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.core.aggregation import unflatten
from fedpilot.core.memory import MemoryModel
from fedpilot.core.partition import dirichlet_partition
from fedpilot.core.strategies import DEFAULT_STRATEGY
from fedpilot.datasets import banking77_dir
from fedpilot.wire.payload import decode_tensors

if TYPE_CHECKING:
    from fedpilot.worker.model import ModelSpec

DEFAULT_DATASET = banking77_dir()
"""BANKING77 as shipped in the package, or ``$FEDPILOT_BANKING77``."""
TIERS = (0.25, 0.5, 1.0)
"""Share of the modules each budget tier fits, cycled over the workers."""


@dataclass
class DemoConfig:
    workers: int = 4
    rounds: int = 8
    strategy: str = DEFAULT_STRATEGY.value
    dataset: Path = DEFAULT_DATASET
    classes: int = 20
    per_class: int = 60
    eval_per_class: int = 20
    alpha: float = 0.5
    local_steps: int = 12
    batch_size: int = 16
    max_seq_len: int = 32
    learning_rate: float = 5e-3
    lora_rank: int = 8
    out: Path = Path("./data/demo")
    database_url: str = ""
    http_port: int = 8080
    model: str = ""
    """Local HF model directory; empty = the bundled all-MiniLM-L6-v2."""
    seed: int = 0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])


def tier_budgets(memory: MemoryModel, workers: int) -> list[int]:
    """Budgets fitting ~25/50/100% of the modules, taken from the top of the model down."""
    order = sorted(memory.modules, key=lambda m: -memory.depth(m.layer))
    budgets = []
    for i in range(workers):
        share = TIERS[i % len(TIERS)]
        chosen = [m.name for m in order[: max(1, round(share * len(order)))]]
        budgets.append(int(memory.cost(chosen) * 1.03))
    return budgets


def _load(
    path: Path, classes: int, per_class: int, seed: int, names: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    from fedpilot.worker.data import load_csv

    data = load_csv(path)
    names = names or sorted(data.label_names)[:classes]
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for name in names:
        cid = data.label_names.index(name)
        rows = [i for i, y in enumerate(data.labels) if y == cid]
        for i in rng.permutation(rows)[:per_class]:
            texts.append(data.texts[i])
            labels.append(name)
    return texts, labels, names


class LoraSetup(Protocol):
    """The model fields a local run shares with its job spec (demo and quality bench)."""

    model: str
    lora_rank: int
    targets: Sequence[str]
    max_seq_len: int
    batch_size: int
    seed: int


def model_spec(config: LoraSetup, num_labels: int) -> ModelSpec:
    """The worker-side model of the run's jobs (same LoRA settings as the job spec)."""
    from fedpilot.worker.model import ModelSpec

    return ModelSpec(
        model_path=config.model or None,
        num_labels=num_labels,
        lora_rank=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        target_modules=tuple(config.targets),
        max_seq_len=config.max_seq_len,
        batch_size=config.batch_size,
    )


def measure_profile(config: LoraSetup, num_labels: int) -> MemoryModel:
    """The memory model of the configuration, measured as a worker measures it."""
    from fedpilot.worker.model import load_model
    from fedpilot.worker.profiling import dummy_batch, profile_memory

    model = load_model(model_spec(config, num_labels), seed=config.seed)
    return profile_memory(model, dummy_batch(model, config.batch_size, config.max_seq_len))


def _free_or_any(port: int) -> int:
    """``port`` if nothing listens there, else 0 (the coordinator picks a free one)."""
    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


STILL_S = 30.0
"""Seconds without a new status line after which the demo says what it is still waiting on."""


def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, object]:
    """Run the demo: dashboard URL first, then one line per phase and a progress bar."""
    console = console or Console()
    start = time.monotonic()
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (config.dataset / "train.csv").is_file():
        raise FileNotFoundError(
            f"no train.csv under {config.dataset} (--dataset or FEDPILOT_BANKING77 names "
            "a folder with train.csv and test.csv)"
        )

    console.rule("[bold]fedpilot demo")
    texts, labels, names = _load(
        config.dataset / "train.csv", config.classes, config.per_class, config.seed
    )
    eval_texts, eval_labels, _ = _load(
        config.dataset / "test.csv", config.classes, config.eval_per_class, config.seed, names
    )
    label_ids = [names.index(y) for y in labels]
    parts = dirichlet_partition(
        label_ids, config.workers, config.alpha, config.seed, min_size=config.batch_size
    )
    data_dir = out / "data"
    files = [
        write_csv(data_dir / f"worker{i}.csv", [texts[j] for j in part], [labels[j] for j in part])
        for i, part in enumerate(parts)
    ]
    eval_file = write_csv(data_dir / "eval.csv", eval_texts, eval_labels)
    job_file = out / "job.json"
    job_file.write_text(json.dumps(_job(config, names, eval_file), indent=2))

    # A run starts from a clean coordinator: an earlier run's database in the same
    # folder would resume its job beside this one.
    shutil.rmtree(out / "cluster", ignore_errors=True)
    cluster = LocalCluster(out / "cluster", db_url=config.database_url)
    try:
        with console.status("starting the coordinator..."):
            address = cluster.start_coordinator(
                job=job_file, http_port=_free_or_any(config.http_port)
            )
        console.print(
            f"dashboard: [bold]{cluster.http_url}/[/bold]  (REST API {cluster.http_url}/api/v1, "
            f"metrics {cluster.http_url}/metrics)"
        )
        console.print(f"coordinator on {address} (gRPC); logs in {cluster.work_dir}")
        console.print(
            f"data: {len(texts)} training queries of {len(names)} intents from "
            f"{config.dataset}, Dirichlet({config.alpha}) over {config.workers} workers; "
            f"{len(eval_texts)} held out"
        )
        console.print("measuring the memory profile of the configuration (loads the model once)")
        with console.status("measuring the memory profile..."):
            memory = measure_profile(config, len(names))
        budgets = tier_budgets(memory, config.workers)
        console.print(
            f"memory model: M0 {_mib(memory.base_bytes)}, all {len(memory.modules)} "
            f"modules {_mib(memory.full_cost())}; budgets " + ", ".join(_mib(b) for b in budgets)
        )
        for i, (path, budget) in enumerate(zip(files, budgets, strict=True)):
            tier = f"{int(TIERS[i % len(TIERS)] * 100)}%"
            cluster.start_worker(f"worker{i}", path, budget, {"tier": tier})
        console.print(f"started {config.workers} worker processes")
        job_row = cluster.store.jobs()[-1]  # the newest: this run's
        final = _watch(cluster, job_row.id, config.rounds, console)
        summary = _summarise(cluster, final, len(names), console)
        with console.status("writing the final adapter..."):
            adapter_dir = _export(cluster, final, config, len(names), out / "adapter")
    finally:
        cluster.stop()
    summary["adapter"] = str(adapter_dir)
    summary["seconds"] = round(time.monotonic() - start, 1)
    console.print(
        f"final PEFT adapter: [bold]{adapter_dir}[/bold] (PeftModel.from_pretrained loads it)"
    )
    console.print(f"finished in {summary['seconds']} s")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _job(config: DemoConfig, names: list[str], eval_file: Path) -> dict[str, object]:
    return {
        "name": "demo",
        "labels": names,
        "rounds": config.rounds,
        "min_workers": config.workers,
        "local_steps": config.local_steps,
        "batch_size": config.batch_size,
        "max_seq_len": config.max_seq_len,
        "learning_rate": config.learning_rate,
        "strategy": config.strategy,
        "round_deadline_s": 300,
        "quorum": 0.5,
        "seed": config.seed,
        "lora": {
            "rank": config.lora_rank,
            "alpha": 2 * config.lora_rank,
            "target_modules": config.targets,
        },
        "eval_dataset": str(eval_file),
        "ig_probe_batches": 1,
    }


def _round_line(number: int, m: dict[str, float]) -> str:
    return (
        f"round {number}: accuracy {m['eval_accuracy']:.3f}, eval loss "
        f"{m['eval_loss']:.3f}, train loss {m['train_loss_before']:.3f} -> "
        f"{m['train_loss_after']:.3f}, {m['updates']:.0f} updates"
    )


def _watch(cluster: LocalCluster, job_id: str, rounds: int, console: Console) -> str:
    """Follow the job: a line per phase change, a line per evaluated round, a progress bar.

    When nothing changes for :data:`STILL_S` seconds it says what it still waits on, so a
    slow phase (profiling on a busy CPU) never looks like a hang."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shown: set[int] = set()
    last_line, last_print, phase_start, phase = "", time.monotonic(), time.monotonic(), ("", -1)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("starting workers", total=rounds)
        while True:
            cluster.check_processes()
            now = time.monotonic()
            state = cluster.progress(job_id)
            if (state.state, state.round) != phase:
                phase, phase_start = (state.state, state.round), now
            for number, metrics in state.evaluated:
                if number not in shown:
                    shown.add(number)
                    progress.console.print(_round_line(number, metrics))
                    last_print = now
            line = state.phase()
            if line != last_line:
                progress.console.print(line)
                last_line, last_print = line, now
            elif now - last_print >= STILL_S:
                progress.console.print(f"{line} (for {now - phase_start:.0f} s)")
                last_print = now
            progress.update(bar, completed=len(shown), description=line)
            if state.finished:
                if state.state != "done":
                    raise RuntimeError(f"job {state.state}: {state.error}")
                return job_id
            time.sleep(1.0)


def _summarise(
    cluster: LocalCluster, job_id: str, classes: int, console: Console
) -> dict[str, object]:
    store = cluster.store
    workers = {w.id: w for w in store.workers()}
    rounds = store.rounds(job_id)
    table = Table(title="Rounds")
    for col in (
        "round",
        "accuracy",
        "eval loss",
        "updates",
        "stragglers",
        "MB in",
        "MB out",
        "seconds",
    ):
        table.add_column(col, justify="right")
    moved = 0
    for rnd in rounds:
        m = rnd.metrics
        moved += int(m.get("bytes_in", 0)) + int(m.get("bytes_out", 0))
        table.add_row(
            str(rnd.number),
            f"{m.get('eval_accuracy', float('nan')):.3f}",
            f"{m.get('eval_loss', float('nan')):.3f}",
            str(m.get("updates", 0)),
            str(len(rnd.stragglers)),
            f"{m.get('bytes_in', 0) / 1e6:.2f}",
            f"{m.get('bytes_out', 0) / 1e6:.2f}",
            f"{m.get('round_seconds', 0):.1f}",
        )
    console.print(table)

    last = rounds[-1].number
    per_worker = Table(title=f"Workers (assignment of round {last})")
    for col in (
        "worker",
        "tier",
        "budget",
        "predicted peak",
        "measured peak",
        "modules",
        "layers trained",
    ):
        per_worker.add_column(col)
    rows = []
    tasks = {t.worker_id: t for t in store.tasks(job_id, last, "train")}
    peaks: dict[str, int] = {}
    for number in range(1, last + 1):
        for u in store.updates(job_id, number):
            peaks[u.worker_id] = max(peaks.get(u.worker_id, 0), u.measured_peak_bytes)
    for wid, w in sorted(workers.items(), key=lambda kv: kv[1].name):
        t = tasks.get(wid)
        modules = list(t.modules) if t else []
        layers = sorted(
            {int(n.split(".")[2]) + 1 if n.startswith("encoder.layer.") else 0 for n in modules},
            reverse=True,
        )
        layer_text = ", ".join(
            "head" if layer == 0 else str(layer)
            for layer in sorted(layers, key=lambda x: -x if x else -99)
        )
        per_worker.add_row(
            w.name,
            str(w.labels.get("tier", "")),
            _mib(w.budget_bytes),
            _mib(t.predicted_bytes) if t else "-",
            _mib(peaks.get(wid, 0)),
            str(len(modules)),
            layer_text,
        )
        rows.append(
            {
                "worker": w.name,
                "budget_bytes": w.budget_bytes,
                "predicted_bytes": t.predicted_bytes if t else 0,
                "measured_peak_bytes": peaks.get(wid, 0),
                "modules": modules,
            }
        )
    console.print(per_worker)
    accuracy = [r.metrics.get("eval_accuracy") for r in rounds]
    console.print(f"bytes moved: {moved / 1e6:.1f} MB over {len(rounds)} rounds")
    console.print(
        f"final accuracy {accuracy[-1]:.3f} on {classes} intents (chance {1 / classes:.3f})"
    )
    return {"accuracy": accuracy, "bytes_moved": moved, "workers": rows, "chance": 1 / classes}


def _export(
    cluster: LocalCluster, job_id: str, config: DemoConfig, num_labels: int, target: Path
) -> Path:
    from fedpilot.worker.model import load_model, load_module_state, save_adapter

    version = cluster.store.latest_version(job_id)
    assert version is not None
    blobs = cluster.data_dir / "blobs" / version.sha256[:2] / version.sha256
    modules = unflatten(decode_tensors(blobs.read_bytes()))
    spec = model_spec(config, num_labels)
    model = load_model(spec, seed=config.seed)
    load_module_state(model, modules)
    return save_adapter(model, target)
