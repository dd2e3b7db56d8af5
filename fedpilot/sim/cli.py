"""`fedpilot simulate`: one job spec, N virtual clients, the quality bench's results files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fedpilot.sim.engine import RoundRecord


def simulate(
    job: Annotated[Path, typer.Argument(help="Job spec JSON, as POST /api/v1/jobs takes it.")],
    data: Annotated[Path, typer.Option(help="Training CSV (text,label) split over the clients.")],
    clients: Annotated[int, typer.Option(min=1, help="Virtual clients (memory tiers cycle).")] = 20,
    setting: Annotated[
        str, typer.Option(help="Split: iid, dirichlet-ALPHA or pathological-K.")
    ] = "dirichlet-0.5",
    out: Annotated[Path, typer.Option(help="results.json, results.md, accuracy.png.")] = Path(
        "./data/simulate"
    ),
    fresh_scores: Annotated[
        bool, typer.Option(help="Probe local IG on the adapter each client is about to train.")
    ] = False,
    rank_baseline: Annotated[
        str | None, typer.Option(help="hetlora or flexlora instead of module assignment.")
    ] = None,
    unconstrained: Annotated[
        bool, typer.Option(help="Budgets that fit every module (the upper bound).")
    ] = False,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default).")] = 0,
    ray_actors: Annotated[
        int,
        typer.Option(
            min=0,
            help="Client turns on this many Ray actors, one torch thread each (0: in this "
            "process).",
        ),
    ] = 0,
) -> None:
    """Run a job on virtual clients in this process, on the workers' and coordinator's code.

    Budgets fit about 25/50/100% of the modules of the measured profile (cycled);
    ``eval_dataset`` of the spec, if set, is evaluated after every round.
    """
    from rich.console import Console
    from rich.progress import Progress

    from fedpilot.bench import quality
    from fedpilot.cluster import write_csv
    from fedpilot.coordinator.evaluation import HeldOutEvaluator
    from fedpilot.coordinator.jobspec import JobSpec
    from fedpilot.demo import tier_budgets
    from fedpilot.sim import ModelCache, SimOptions, Simulation, VirtualClient
    from fedpilot.sim.runners import runner_for
    from fedpilot.worker.data import load_data

    console = Console(stderr=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = JobSpec.model_validate_json(job.read_text())
    dataset = load_data(data, label_names=spec.labels or None, num_labels=spec.num_labels)
    names, alpha = quality.parse_setting(setting)
    parts = quality.partition(dataset.labels, clients, alpha, spec.seed, min_size=spec.batch_size)
    label_names = list(dataset.label_names)
    files = [
        write_csv(
            out / "data" / f"client{i:03d}.csv",
            [dataset.texts[j] for j in p],
            [label_names[dataset.labels[j]] for j in p],
        )
        for i, p in enumerate(parts)
    ]
    cache = ModelCache()
    memory, _ = cache.profile(spec)
    budgets = (
        [quality.unconstrained_budget(memory)] * clients
        if unconstrained
        else tier_budgets(memory, clients)
    )
    virtual = [
        VirtualClient(f"client{i:03d}", f, b)
        for i, (f, b) in enumerate(zip(files, budgets, strict=True))
    ]
    runner = runner_for(ray_actors)
    sim = Simulation(
        spec,
        virtual,
        evaluator=HeldOutEvaluator() if spec.eval_dataset else None,
        options=SimOptions(fresh_scores=fresh_scores, rank_baseline=rank_baseline),
        cache=cache,
        runner=runner,
    )
    start = time.monotonic()
    with Progress(console=console) as bar:
        task = bar.add_task(f"{spec.name}: {clients} clients", total=spec.rounds)

        def advance(r: RoundRecord) -> None:
            acc = "-" if r.eval_accuracy is None else f"{r.eval_accuracy:.3f}"
            bar.update(task, advance=1, description=f"round {r.number}: accuracy {acc}")

        try:
            result = sim.run(advance)
        finally:
            runner.close()
    row = {
        "bench": "quality",
        "engine": "sim",
        "setting": names,
        "method": spec.name,
        "kind": "job",
        "seed": spec.seed,
        "state": "done",
        "workers": clients,
        "rounds": spec.rounds,
        "wall_s": round(time.monotonic() - start, 1),
        **quality.sim_result(result),
    }
    config = quality.QualityConfig(
        workers=clients,
        rounds=spec.rounds,
        settings=(names,),
        methods=(spec.name,),
        classes=spec.num_labels,
        local_steps=spec.local_steps,
        out=out,
        engine="sim",
    )
    out.mkdir(parents=True, exist_ok=True)
    quality.write_reports([row], config)
    console.print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy.png'}")
    typer.echo(json.dumps(row))
