"""The `fedpilot` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedpilot import __version__
from fedpilot.bench.cli import bench_app
from fedpilot.services_cli import coordinator, db_app, worker

app = typer.Typer(
    help="Federated LoRA fine-tuning for clients with heterogeneous GPU memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")
app.add_typer(db_app, name="db")
app.command()(coordinator)
app.command()(worker)


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
        str, typer.Option(help="Comma-separated LoRA targets.")
    ] = "query,value",
    num_labels: Annotated[int, typer.Option(min=2)] = 2,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    output: Annotated[Path | None, typer.Option(help="Also write the JSON here.")] = None,
) -> None:
    """Measure the memory model of a LoRA configuration; prints `fedpilot plan` JSON."""
    from fedpilot.worker.cli import profile_main

    raise typer.Exit(
        profile_main(
            model or None,
            batch_size,
            seq_len,
            rank,
            target_modules=target_modules,
            num_labels=num_labels,
            dtype=dtype,
            device=device,
            output=output,
        )
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
