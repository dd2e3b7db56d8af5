"""`fedpilot submit | jobs | status | cancel | adapter | workers`: the REST API from a shell.

The URL and token come from flags or ``FEDPILOT_API_URL`` / ``FEDPILOT_API_TOKEN``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedpilot.api_client import DEFAULT_URL, TERMINAL, ApiClient, ApiError, dumps, load_spec

ApiUrl = Annotated[str, typer.Option("--api", envvar="FEDPILOT_API_URL", help="Coordinator URL.")]
Token = Annotated[
    str, typer.Option("--token", envvar="FEDPILOT_API_TOKEN", help="API bearer token.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]

console = Console()


def _fail(e: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(code)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (see examples/job.yaml).")],
    api: ApiUrl = DEFAULT_URL,
    token: Token = "",
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
) -> None:
    """Submit a job; prints its id."""
    try:
        with ApiClient(api, token) as client:
            job_id = client.submit(load_spec(spec))
    except (ApiError, ValueError) as e:
        raise _fail(e, 2) from e
    typer.echo(job_id)
    if watch:
        status(job_id, api=api, token=token, watch=True)


def jobs(api: ApiUrl = DEFAULT_URL, token: Token = "", as_json: AsJson = False) -> None:
    """List jobs, newest first."""
    try:
        with ApiClient(api, token) as client:
            rows = client.jobs()
    except ApiError as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(dumps(rows))
        return
    table = Table(title=f"jobs at {api}")
    for col in ("id", "name", "state", "round", "strategy", "accuracy", "created"):
        table.add_column(col)
    for j in rows:
        table.add_row(
            j["id"],
            j["name"],
            j["state"],
            f"{j['current_round']}/{j['rounds']}",
            j["strategy"],
            _pct(j["eval_accuracy"]),
            j["created_at"][:19],
        )
    console.print(table)


def _view(job: dict[str, Any], current: dict[str, Any] | None) -> Group:
    head = Text.assemble(
        (f"{job['name']} ", "bold"),
        f"{job['id']}  ",
        (job["state"], "green" if job["state"] == "done" else "yellow"),
        f"  round {job['current_round']}/{job['rounds']}  strategy {job['strategy']}",
    )
    table = Table(expand=True)
    for col in ("round", "state", "uploads", "progress", "accuracy", "eval loss", "train loss"):
        table.add_column(col)
    for r in job["history"]:
        total = done = 0
        if current is not None and current["number"] == r["number"]:
            train = [a for a in current["assignments"] if a["kind"] == "train"]
            total = sum(a["status"] in ("offered", "done", "straggler") for a in train)
            done = sum(a["status"] == "done" for a in train)
        closed = r["closed_at"] is not None
        bar = ProgressBar(total=max(total, 1), completed=max(total, 1) if closed else done)
        table.add_row(
            str(r["number"]),
            r["state"],
            "-" if closed else f"{done}/{total}",
            bar,
            _pct(r["eval_accuracy"]),
            _pct(r["eval_loss"]),
            _pct(r["train_loss_after"]),
        )
    parts: list[Any] = [head, table]
    if job.get("error"):
        parts.append(Text(f"error: {job['error']}", style="red"))
    if job.get("problems"):
        parts.append(_problems(job["problems"]))
    return Group(*parts)


def problem_text(p: dict[str, Any]) -> str:
    """One line for a task that did not complete: what, where, and the worker's words."""
    return f"{p['reason']} (round {p['round']} {p['kind']}): {p['message']}"


def _problems(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="workers whose latest task did not complete", expand=True)
    table.add_column("worker")
    table.add_column("why", overflow="fold", style="red")
    for p in rows:
        table.add_row(p.get("worker_name") or p["worker_id"][:8], problem_text(p))
    return table


def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    api: ApiUrl = DEFAULT_URL,
    token: Token = "",
    watch: Annotated[bool, typer.Option(help="Refresh until the job ends.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    as_json: AsJson = False,
) -> None:
    """Show a job's rounds: state, upload progress, accuracy and loss."""
    try:
        with ApiClient(api, token) as client:

            def fetch() -> tuple[dict[str, Any], dict[str, Any] | None]:
                job = client.job(job_id)
                n = job["current_round"]
                return job, (client.round(job_id, n) if n >= 1 and job["history"] else None)

            job, current = fetch()
            if as_json:
                typer.echo(dumps(job))
                return
            if not watch:
                console.print(_view(job, current))
                return
            with Live(_view(job, current), console=console, refresh_per_second=4) as live:
                while job["state"] not in TERMINAL:
                    time.sleep(interval)
                    job, current = fetch()
                    live.update(_view(job, current))
    except ApiError as e:
        raise _fail(e) from e
    if job["state"] == "failed":
        raise typer.Exit(1)


def cancel(job_id: str, api: ApiUrl = DEFAULT_URL, token: Token = "") -> None:
    """Cancel a job (its open round closes; workers' uploads are refused)."""
    try:
        with ApiClient(api, token) as client:
            job = client.cancel(job_id)
    except ApiError as e:
        raise _fail(e) from e
    typer.echo(f"{job['id']} {job['state']}")


def adapter(
    job_id: str,
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory to write the adapter to.")],
    version: Annotated[int | None, typer.Option(help="Adapter version (default latest).")] = None,
    api: ApiUrl = DEFAULT_URL,
    token: Token = "",
) -> None:
    """Download the global adapter as a PEFT adapter directory."""
    try:
        with ApiClient(api, token, timeout=300) as client:
            number = client.adapter(job_id, out, version)
    except ApiError as e:
        raise _fail(e) from e
    typer.echo(f"adapter version {number} written to {out} (PeftModel.from_pretrained loads it)")


def workers(api: ApiUrl = DEFAULT_URL, token: Token = "", as_json: AsJson = False) -> None:
    """List workers: alive, labels, budget, last heartbeat, why the latest task failed."""
    try:
        with ApiClient(api, token) as client:
            rows = client.workers()
    except ApiError as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(dumps(rows))
        return
    table = Table(title=f"workers at {api}")
    for col in ("name", "id", "alive", "state", "budget", "labels", "last heartbeat"):
        table.add_column(col)
    table.add_column("latest task did not complete", overflow="fold", style="red")
    for w in rows:
        problem = w.get("problem")
        table.add_row(
            w["name"],
            w["id"][:8],
            "yes" if w["alive"] else "no",
            w["state"],
            f"{w['budget_bytes'] / 2**20:,.0f} MiB",
            ", ".join(f"{k}={v}" for k, v in w["labels"].items()),
            w["last_heartbeat"][:19],
            problem_text(problem) if problem else "",
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    for command in (submit, jobs, status, cancel, adapter, workers):
        app.command()(command)
