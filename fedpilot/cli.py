"""The `fedpilot` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedpilot import __version__, client_cli
from fedpilot.bench.cli import bench_app
from fedpilot.core.strategies import DEFAULT_STRATEGY, Strategy
from fedpilot.services_cli import coordinator, db_app, worker
from fedpilot.sim.cli import simulate

app = typer.Typer(
    help="Federated LoRA fine-tuning for clients with heterogeneous GPU memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")
app.add_typer(db_app, name="db")
app.command()(coordinator)
app.command()(worker)
app.command()(simulate)
client_cli.register(app)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
def version() -> None:
    """Print the fedpilot version."""
    typer.echo(__version__)


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Plan file (JSON); see docs/configuration.md.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show which LoRA modules each client would train within its memory budget."""
    from fedpilot.plan import PlanError, load_plan, plan_json, run_plan

    try:
        parsed = load_plan(spec)
    except PlanError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    assignments = run_plan(parsed)
    if as_json:
        typer.echo(json.dumps(plan_json(assignments), indent=2))
        return
    table = Table(title=f"Assignment ({parsed.strategy.value}); --json lists module names")
    for col in ("client", "budget", "predicted", "modules", "value", "layers trained (modules)"):
        table.add_column(col, overflow="fold")
    budgets = {c.name: c.budget_bytes for c in parsed.clients}
    layer_of = {m.name: m.layer for m in parsed.modules}
    for a in assignments:
        if a.feasible:
            per_layer = Counter(layer_of[n] for n in a.modules)
            trains = (
                " · ".join(
                    f"{'head' if layer == 0 else layer} ({n})"
                    for layer, n in sorted(per_layer.items(), key=lambda kv: -(kv[0] or 1e9))
                )
                or "nothing"
            )
        else:
            trains = f"[red]sits out: {a.reason}[/red]"
        table.add_row(
            a.client,
            _mib(budgets[a.client]),
            _mib(a.predicted_bytes) if a.feasible else "-",
            f"{len(a.modules)}/{len(parsed.modules)}",
            f"{a.value:.3f}",
            trains,
        )
    Console().print(table)


@app.command()
def profile(
    model: Annotated[
        str, typer.Option(help="Local HF model directory (default: bundled MiniLM).")
    ] = "",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=1)] = 128,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    target_modules: Annotated[
        str,
        typer.Option(help="Comma-separated LoRA target names, one pattern, or all-linear."),
    ] = "query,value",
    num_labels: Annotated[int, typer.Option(min=2)] = 2,
    task: Annotated[
        str, typer.Option(help="sequence-classification, causal-lm or image-classification.")
    ] = "sequence-classification",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    output: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
) -> None:
    """Measure the memory model of a LoRA configuration; prints `fedpilot plan` JSON."""
    from fedpilot.worker.profiling import run_profile_command

    targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    text = json.dumps(
        run_profile_command(
            model or None,
            batch_size,
            seq_len,
            rank,
            target_modules=targets,
            num_labels=num_labels,
            dtype=dtype,
            device=device,
            task=task,
        ),
        indent=2,
    )
    if output is not None:
        output.write_text(text + "\n")
    typer.echo(text)


@app.command()
def demo(
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 4,
    rounds: Annotated[int, typer.Option(min=1)] = 8,
    strategy: Annotated[
        Strategy, typer.Option(help="Which modules each worker trains (docs/configuration.md).")
    ] = DEFAULT_STRATEGY,
    dataset: Annotated[
        Path | None, typer.Option(help="Folder with train.csv and test.csv (text, label).")
    ] = None,
    classes: Annotated[int, typer.Option(min=2, help="Intents used.")] = 20,
    per_class: Annotated[int, typer.Option(min=1, help="Training queries per intent.")] = 60,
    alpha: Annotated[float, typer.Option(help="Dirichlet label skew (smaller = more skew).")] = 0.5,
    local_steps: Annotated[int, typer.Option(min=1)] = 12,
    out: Annotated[Path, typer.Option(help="Work directory (data, logs, adapter).")] = Path(
        "./data/demo"
    ),
    database_url: Annotated[str, typer.Option(envvar="FEDPILOT_DATABASE_URL")] = "",
    http_port: Annotated[
        int, typer.Option(help="Dashboard and REST API port (0 = any free; busy = any free).")
    ] = 8080,
) -> None:
    """Run a federated fine-tuning job on a local cluster of processes (Ctrl-C stops all)."""
    from fedpilot.demo import DEFAULT_DATASET, DemoConfig, run_demo

    config = DemoConfig(
        workers=workers,
        rounds=rounds,
        strategy=strategy.value,
        dataset=dataset or DEFAULT_DATASET,
        classes=classes,
        per_class=per_class,
        alpha=alpha,
        local_steps=local_steps,
        out=out,
        database_url=database_url,
        http_port=http_port,
    )
    try:
        run_demo(config)
    except (FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


def main() -> None:
    app()


if __name__ == "__main__":
    main()


@app.command()
def certs(
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory for the PEM files.")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="Coordinator host name or IP (repeatable; first = common name)."),
    ] = None,
    worker: Annotated[
        list[str] | None, typer.Option(help="Make a client certificate for this worker.")
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=3650)] = 365,
) -> None:
    """Make a CA, a coordinator certificate and worker certificates for a test cluster."""
    from fedpilot.tls import make_cluster_certs

    made = make_cluster_certs(
        out, hosts=host or ["localhost", "127.0.0.1"], workers=worker or [], days=days
    )
    typer.echo(f"CA:          {made.ca}  (give to workers: --tls-ca)")
    typer.echo(f"coordinator: --tls-cert {made.server_cert} --tls-key {made.server_key}")
    typer.echo(f"             --tls-client-ca {made.ca}  (mutual TLS)")
    for name, (cert, key) in made.clients.items():
        typer.echo(f"worker {name}: --tls-cert {cert} --tls-key {key}")
