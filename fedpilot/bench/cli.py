"""`fedpilot bench ...`: measured numbers as JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable
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


@bench_app.command("transfer")
def transfer(
    size_mib: Annotated[int, typer.Option(min=4, help="Adapter size in MiB.")] = 256,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats; best is kept.")] = 3,
) -> None:
    """Adapter upload/download through the real coordinator vs bare gRPC and raw TCP."""
    from fedpilot.bench import transfer as bench

    _emit(bench.run(size_mib, repeats))


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
