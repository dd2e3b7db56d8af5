"""`fedpilot coordinator`, `fedpilot worker` and `fedpilot db`: the long-running services."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _wait_for_signal() -> None:
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def coordinator(
    data_dir: Annotated[
        Path,
        typer.Option(envvar="FEDPILOT_DATA_DIR", help="Blobs and the embedded SQLite database."),
    ] = Path("./data/coordinator"),
    database_url: Annotated[
        str, typer.Option(envvar="FEDPILOT_DATABASE_URL", help="PostgreSQL URL; empty = SQLite.")
    ] = "",
    host: Annotated[str, typer.Option(envvar="FEDPILOT_GRPC_HOST", help="gRPC bind address.")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int, typer.Option(envvar="FEDPILOT_GRPC_PORT", help="gRPC port (0 = any free port).")
    ] = 50051,
    job: Annotated[Path | None, typer.Option(help="Submit this job spec (JSON) at start.")] = None,
    evaluate: Annotated[bool, typer.Option(help="Evaluate rounds on the job's eval set.")] = True,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here.")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="FEDPILOT_METRICS_PORT", help="Also serve Prometheus /metrics on this port."
        ),
    ] = None,
    http_host: Annotated[
        str,
        typer.Option(
            envvar="FEDPILOT_HTTP_HOST",
            help="REST API / dashboard bind address (loopback only without a token).",
        ),
    ] = "127.0.0.1",
    http_port: Annotated[
        int,
        typer.Option(
            envvar="FEDPILOT_HTTP_PORT",
            help="REST API, dashboard and /metrics port (0 = any free, -1 = off).",
        ),
    ] = 8080,
    http_port_file: Annotated[
        Path | None, typer.Option(help="Write the bound HTTP port here.")
    ] = None,
    api_token: Annotated[
        str, typer.Option(envvar="FEDPILOT_API_TOKEN", help="Bearer token of the REST API.")
    ] = "",
    enrollment_secret: Annotated[
        str,
        typer.Option(
            envvar="FEDPILOT_ENROLLMENT_SECRET", help="Workers must present it to register."
        ),
    ] = "",
    tls_cert: Annotated[
        Path | None,
        typer.Option(envvar="FEDPILOT_TLS_CERT", help="PEM certificate: TLS on gRPC and HTTP."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="FEDPILOT_TLS_KEY", help="PEM key of --tls-cert.")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="FEDPILOT_TLS_CLIENT_CA",
            help="Require worker certificates signed by this CA (mutual TLS).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the coordinator: migrate the database, serve gRPC and HTTP, drive rounds."""
    from fedpilot.coordinator.jobspec import JobSpec
    from fedpilot.coordinator.server import start
    from fedpilot.coordinator.settings import CoordinatorSettings

    _logging(log_level)
    try:
        settings = CoordinatorSettings(
            data_dir=data_dir,
            database_url=database_url,
            grpc_host=host,
            grpc_port=port,
            metrics_port=metrics_port,
            http_host=http_host,
            http_port=None if http_port < 0 else http_port,
            api_token=api_token,
            enrollment_secret=enrollment_secret,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    evaluator = None
    if evaluate:
        from fedpilot.coordinator.evaluation import HeldOutEvaluator

        evaluator = HeldOutEvaluator()
    running = start(settings, evaluator=evaluator)
    if job is not None:
        spec = JobSpec.model_validate(json.loads(job.read_text()))
        job_id = running.store.create_job(spec.name, spec.model_dump(mode="json"))
        logging.getLogger("fedpilot").info("submitted job %s (%s)", job_id, spec.name)
    if http_port_file is not None and running.http_port is not None:
        http_port_file.write_text(str(running.http_port))
    if port_file is not None:
        port_file.write_text(str(running.port))
    _wait_for_signal()
    running.stop()


def worker(
    data: Annotated[
        Path,
        typer.Option(
            help="This worker's training data: a .csv or .jsonl file, or a directory "
            "written by datasets' save_to_disk."
        ),
    ],
    coordinator: Annotated[str, typer.Option(help="Coordinator gRPC address.")] = "127.0.0.1:50051",
    name: Annotated[str, typer.Option(help="Display name.")] = "worker",
    memory_budget: Annotated[
        str,
        typer.Option(
            help="e.g. 6GiB; required on CPU, may only lower the CUDA budget (what it "
            "counts: see above)."
        ),
    ] = "",
    safety_margin: Annotated[str, typer.Option(help="Kept free on CUDA.")] = "512MiB",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")] = None,
    enrollment_secret: Annotated[str, typer.Option(envvar="FEDPILOT_ENROLLMENT_SECRET")] = "",
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0 = default).")] = 0,
    partition: Annotated[
        str, typer.Option(help="i/N: train on part i (0-based) of N of a shared --data file.")
    ] = "",
    partition_alpha: Annotated[
        float | None, typer.Option(help="Dirichlet label skew of --partition (omit = IID).")
    ] = None,
    partition_seed: Annotated[int, typer.Option()] = 0,
    text_column: Annotated[
        str | None, typer.Option(help="Text column/key (default: text, sentence or content).")
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(help="Label column/key (default: label, category, intent or class)."),
    ] = None,
    skip_unknown_labels: Annotated[
        bool,
        typer.Option(
            "--skip-unknown-labels/--strict-labels",
            help="Leave out examples whose label the job does not list (counted in the log), "
            "or refuse the job's tasks when there are any.",
        ),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(envvar="FEDPILOT_WORKER_METRICS_PORT", help="Serve Prometheus /metrics."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Bind address of /metrics (it holds no secrets).")
    ] = "0.0.0.0",
    tls_ca: Annotated[
        Path | None,
        typer.Option(envvar="FEDPILOT_TLS_CA", help="CA of the coordinator's certificate (TLS)."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(envvar="FEDPILOT_TLS_CERT", help="This worker's certificate (mutual TLS)."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="FEDPILOT_TLS_KEY", help="Key of --tls-cert.")
    ] = None,
    memory_cgroup: Annotated[
        bool,
        typer.Option(
            help="CPU, as root or with a delegated cgroup: move into a memory cgroup of its own "
            "limited to baseline + budget, so the kernel stops an overrun."
        ),
    ] = True,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run a worker: register, then profile and train what the coordinator assigns.

    The memory budget is what no task may exceed (profile, IG probe, training steps,
    evaluation, payloads). CUDA: device memory of this process's PyTorch allocator,
    capped there; an overrun fails the task as OUT_OF_MEMORY and the worker goes on.
    CPU: the model's weights plus what a task adds above the idle worker with the job
    loaded. That baseline (interpreter, libraries, tokenizer, data, a 16 MiB heap
    reserve) is logged and exported as fedpilot_worker_memory_baseline_bytes: a machine
    needs baseline + budget. As root, the worker limits its own memory cgroup to that.
    """
    from fedpilot.worker.service import WorkerService, WorkerSettings, parse_bytes

    _logging(log_level)
    labels = dict(item.split("=", 1) for item in (label or []) if "=" in item)
    try:
        part = None
        if partition:
            index, _, count = partition.partition("/")
            part = (int(index), int(count))
            if not 0 <= part[0] < part[1]:
                raise ValueError(f"--partition {partition}: need 0 <= i < N")
        settings = WorkerSettings(
            coordinator=coordinator,
            name=name,
            data=data,
            memory_budget=parse_bytes(memory_budget) if memory_budget else None,
            safety_margin=parse_bytes(safety_margin),
            device=device,
            labels=labels,
            enrollment_secret=enrollment_secret,
            threads=threads,
            partition=part,
            partition_alpha=partition_alpha,
            partition_seed=partition_seed,
            text_column=text_column,
            label_column=label_column,
            skip_unknown_labels=skip_unknown_labels,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            memory_cgroup=memory_cgroup,
        )
        service = WorkerService(settings)
        examples = service.check_data()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    logging.getLogger("fedpilot").info("%s: %d examples", data, examples)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.shutdown())
    service.run()


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[str, typer.Option(envvar="FEDPILOT_DATABASE_URL")] = "",
    data_dir: Annotated[Path, typer.Option()] = Path("./data/coordinator"),
) -> None:
    """Apply all schema migrations."""
    from fedpilot.coordinator.db import migrate
    from fedpilot.coordinator.db.store import database_url as default_url
    from fedpilot.coordinator.db.store import make_engine

    engine = make_engine(database_url or default_url(data_dir))
    migrate.upgrade(engine)
    typer.echo(f"database at revision {migrate.current_revision(engine)}")
