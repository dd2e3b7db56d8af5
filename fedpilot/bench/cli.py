"""`fedpilot bench ...`: measured numbers as JSON lines."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

bench_app = typer.Typer(help="Benchmarks (one JSON object per line).", no_args_is_help=True)


def _emit(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        typer.echo(json.dumps(row), nl=True)


@bench_app.command("solver")
def solver(
    clients: Annotated[int, typer.Option(help="Clients to assign.")] = 1000,
    layers: Annotated[int, typer.Option(help="Transformer layers.")] = 12,
    targets: Annotated[int, typer.Option(help="LoRA targets per layer (1-6).")] = 6,
    repeats: Annotated[int, typer.Option(help="Timed repetitions (best is reported).")] = 5,
    small_instances: Annotated[int, typer.Option(help="Brute-force comparisons.")] = 200,
) -> None:
    """Time every assignment strategy on many clients; optimality vs brute force."""
    from fedpilot.bench import solver as bench

    _emit(bench.run(clients, layers, targets, repeats, small_instances))


@bench_app.command("aggregate")
def aggregate(
    clients: Annotated[list[int] | None, typer.Option(help="Client counts (repeatable).")] = None,
    merge: Annotated[
        list[str] | None,
        typer.Option(
            help="factors and/or exact (exact holds a dense out x in product per module)."
        ),
    ] = None,
) -> None:
    """STAgg throughput in GB/s against numpy memcpy, and peak memory."""
    from fedpilot.bench import aggregate as bench

    _emit(bench.run(tuple(clients or (10, 100)), tuple(merge or ("factors",))))


@bench_app.command("exact")
def exact(
    shape: Annotated[
        list[str] | None,
        typer.Option(
            help="bert-base (72 modules, rank 8, 10 clients) "
            "and/or 7b-layer (4096 x 4096, rank 16, 100 clients)."
        ),
    ] = None,
) -> None:
    """The exact merge from stacked factors vs dense products: time, peak, error to exact SVD."""
    from fedpilot.bench import exact as bench

    _emit(bench.run(tuple(shape or ("bert-base", "7b-layer"))))


@bench_app.command("blobs")
def blobs(
    sizes: Annotated[
        list[int] | None, typer.Option(help="Payload sizes in MiB (repeatable).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    postgres_url: Annotated[str, typer.Option(help="PostgreSQL to compare against.")] = "",
) -> None:
    """Adapter bytes in a blob directory against PostgreSQL bytea (write/read MiB/s, memory)."""
    from fedpilot.bench import blobs as bench

    _emit(bench.run(tuple(sizes or (1, 8, 32)), repeats, postgres_url=postgres_url or None))


@bench_app.command("statements")
def statements(
    reads: Annotated[int, typer.Option(min=1)] = 2000,
    postgres_url: Annotated[str, typer.Option(help="PostgreSQL to read from.")] = "",
) -> None:
    """A poll's statement through SQLAlchemy and through psycopg alone, blocking and
    asyncio (CPU and wall per read)."""
    from fedpilot.bench import statements as bench
    from fedpilot.bench.blobs import _url

    _emit(bench.measure(reads, postgres_url or _url()))


@bench_app.command("transfer")
def transfer(
    size_mib: Annotated[int, typer.Option(min=4, help="Adapter size in MiB.")] = 256,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats; best is kept.")] = 3,
) -> None:
    """Adapter upload/download through the real coordinator vs bare gRPC and raw TCP."""
    from fedpilot.bench import transfer as bench

    _emit(bench.run(size_mib, repeats))


@bench_app.command("quality")
def quality(
    quick: Annotated[
        bool, typer.Option("--quick", help="Minutes: 3 rounds, 3 local steps, 10 classes.")
    ] = False,
    workers: Annotated[int | None, typer.Option(min=3, help="Workers (tiers cycle).")] = None,
    rounds: Annotated[int | None, typer.Option(min=1)] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="Partition: dirichlet-ALPHA, iid or pathological-K (K classes per client; "
            "repeatable; default dirichlet-0.5)."
        ),
    ] = None,
    all_settings: Annotated[
        bool,
        typer.Option(
            "--all-settings", help="iid, dirichlet-0.5, dirichlet-0.1 and pathological-2."
        ),
    ] = False,
    method: Annotated[
        list[str] | None, typer.Option(help="Only these methods (repeatable; default all).")
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Folder with train.csv/test.csv, or one CSV (text and label columns)."),
    ] = None,
    model: Annotated[str, typer.Option(help="Local HF model directory (default: MiniLM).")] = "",
    classes: Annotated[int | None, typer.Option(min=2)] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="Only these labels of the dataset (repeatable; default: the first "
            "--classes labels by name)."
        ),
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(min=1, help="Training examples per class.")
    ] = None,
    eval_per_class: Annotated[int | None, typer.Option(min=1)] = None,
    local_steps: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_seq_len: Annotated[int | None, typer.Option(min=8)] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    target: Annotated[
        float | None,
        typer.Option(help="Accuracy for 'rounds to target' (default 0.9 x the bound's best)."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="results.json, results.md, accuracy.png.")] = Path(
        "./data/bench-quality"
    ),
    database_url: Annotated[
        str, typer.Option(help="Default: FEDPILOT_DATABASE_URL or SQLite.")
    ] = "",
    engine: Annotated[
        str, typer.Option(help="sim: virtual clients in one process; cluster: real processes.")
    ] = "sim",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method (seed, seed+1, ...).")] = 1,
    participants: Annotated[
        int | None, typer.Option(min=1, help="Clients sampled per round (default: all).")
    ] = None,
    probe_examples: Annotated[
        int | None, typer.Option(min=1, help="Examples per local IG probe.")
    ] = None,
    eval_max: Annotated[
        int | None, typer.Option(min=1, help="Held-out examples evaluated per round.")
    ] = None,
    threads: Annotated[
        int, typer.Option(min=0, help="torch threads of the simulator (0: torch's default).")
    ] = 0,
    ray_actors: Annotated[
        int,
        typer.Option(
            min=0, help="Simulator: client turns on this many Ray actors (0: in this process)."
        ),
    ] = 0,
    from_runs: Annotated[
        list[Path] | None,
        typer.Option(help="Run nothing: report the runs in these runs.jsonl files (repeatable)."),
    ] = None,
) -> None:
    """Fed-piLot vs fixes, ablations, baselines and an unconstrained bound.

    ``--engine sim`` (default) runs virtual clients on the services' own functions;
    ``--engine cluster`` runs a real local cluster. Progress and the tables go to
    stderr; one JSON object per run to stdout; every finished run is appended to
    ``OUT/runs.jsonl`` as it ends.
    """
    from dataclasses import replace

    from rich.console import Console

    from fedpilot.bench import quality as bench

    config = bench.QualityConfig()
    if quick:
        config = bench.quick(config)
    given = {
        "workers": workers,
        "rounds": rounds,
        "dataset": dataset,
        "classes": len(label) if label else classes,
        "labels": tuple(label) if label else None,
        "per_class": per_class,
        "eval_per_class": eval_per_class,
        "local_steps": local_steps,
        "batch_size": batch_size,
        "max_seq_len": max_seq_len,
        "learning_rate": learning_rate,
        "participants": participants,
        "probe_examples": probe_examples,
        "eval_max": eval_max,
    }
    settings = (
        ("iid", "dirichlet-0.5", "dirichlet-0.1", "pathological-2")
        if all_settings
        else tuple(setting or ())
    )
    config = replace(
        config,
        **{k: v for k, v in given.items() if v is not None},
        settings=tuple(bench.parse_setting(s)[0] for s in settings) or config.settings,
        methods=tuple(method or config.methods),
        model=model,
        seed=seed,
        target_accuracy=target,
        out=out,
        database_url=database_url,
        engine=engine,
        seeds=seeds,
        ray_actors=ray_actors,
    )
    if threads:
        import torch

        torch.set_num_threads(threads)
    console = Console(stderr=True)
    if from_runs:
        rows = bench.load_runs(from_runs)
        config.out.mkdir(parents=True, exist_ok=True)
        target = bench.write_reports(rows, config)
        console.print(bench.rich_table(rows, target))
        console.print(bench.rich_summary(rows))
        console.print(f"results: {out / 'results.md'}, {out / 'results.json'}")
        return
    # SIGTERM as Ctrl-C: unwind, so the cluster's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = bench.run(config, bench.Progress(console.print))
    console.print(bench.rich_table(rows, rows[0]["target_accuracy"] if rows else 0.0))
    console.print(bench.rich_summary(rows))
    console.print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy.png'}")
    _emit(rows)


@bench_app.command("round")
def round_(
    workers: Annotated[
        list[int] | None, typer.Option(help="Simulated worker counts (repeatable).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=2, help="Rounds per count; round 1 profiles.")] = 3,
    poll_wait_ms: Annotated[
        int, typer.Option(min=0, help="Workers' long-poll wait (the real default: 5000).")
    ] = 5_000,
    compute_s: Annotated[float, typer.Option(min=0, help="Sleep in place of training.")] = 0.0,
    layers: Annotated[int, typer.Option(min=1, help="Encoder layers of the adapter.")] = 12,
    targets: Annotated[int, typer.Option(min=1, max=6, help="LoRA targets per layer.")] = 2,
    timeout_s: Annotated[float, typer.Option(help="Give up on one count after this.")] = 900.0,
    database_url: Annotated[
        str, typer.Option(help="Default: FEDPILOT_DATABASE_URL or SQLite.")
    ] = "",
) -> None:
    """Round overhead of the system with workers that move real tensors but skip training."""
    from fedpilot.bench import round as bench

    config = bench.RoundConfig(
        rounds=rounds,
        layers=layers,
        targets=targets,
        poll_wait_ms=poll_wait_ms,
        compute_s=compute_s,
        timeout_s=timeout_s,
        database_url=database_url,
    )
    _emit(bench.run(tuple(workers or (10, 100, 500)), config))


@bench_app.command("load")
def load(
    workers: Annotated[
        list[int] | None, typer.Option(help="Simulated worker counts (repeatable).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1)] = 2,
    database_url: Annotated[
        str, typer.Option(envvar="FEDPILOT_DATABASE_URL", help="PostgreSQL (empty = SQLite).")
    ] = "",
    timeout_s: Annotated[float, typer.Option(min=10, help="Give up on one count after this.")] = (
        600.0
    ),
) -> None:
    """Many light simulated workers on the real protocol: registrations/s, round close,
    RPC latency, coordinator CPU and memory, errors."""
    from fedpilot.bench import load as bench

    config = bench.LoadConfig(rounds=rounds, database_url=database_url, timeout_s=timeout_s)
    _emit(bench.run(tuple(workers or (500,)), config))


@bench_app.command("memory")
def memory(
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch sizes (repeatable; default 8 and 16).")
    ] = None,
    seq: Annotated[
        list[int] | None, typer.Option(help="Sequence lengths (repeatable; default 32 and 64).")
    ] = None,
    modules: Annotated[
        list[str] | None,
        typer.Option(
            help="Module subsets: top, bottom, half, all (repeatable; default top, bottom, all)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per task.")] = 3,
    model: Annotated[str, typer.Option(help="Local HF model directory (default: MiniLM).")] = "",
) -> None:
    """Predicted peak of the memory model vs the peak a memory cgroup meters around a child
    process running one worker task (needs root or a delegated cgroup)."""
    from fedpilot.bench import memory as bench

    summary: dict[str, Any] = {}
    for row in bench.run(
        tuple(batch or (8, 16)),
        tuple(seq or (32, 64)),
        tuple(modules or ("top", "bottom", "all")),
        steps=steps,
        model=model or None,
    ):
        _emit([row])
        summary = row
    typer.echo(
        f"memory: {summary['points']} points, {summary['under_predictions']} under-predictions, "
        f"predicted/measured median {summary['median_ratio']}, range "
        f"{summary['min_ratio']}-{summary['max_ratio']}",
        err=True,
    )
    if summary["under_predictions"]:
        raise typer.Exit(1)
