"""`fedpilot bench memory`: the memory model's prediction against an independent meter.

For each batch size, sequence length and module subset, the worker's profile
predicts ``cost(S)`` (``fedpilot.worker.profiling.profile_memory``, measured in
this process). A child process then runs one whole training task of a worker
(model load, tokenizer and data, adapter decode, IG probe, the training steps
with their loss evaluations, update encode) inside a memory cgroup this process
created. The meter is the kernel's: ``memory.max_usage_in_bytes`` of the group
minus its usage once the child had imported its libraries (the runtime
baseline of the budget definition, see ``fedpilot.worker.budget``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

SUBSETS = ("top", "bottom", "all", "half")
"""``top``: the head and the last layer's modules; ``bottom``: the first layer's
modules (back-propagation reaches the input); ``all``; ``half``: the upper half."""


def subset_modules(memory: Any, which: str) -> list[str]:
    """Module names of a named subset of a :class:`~fedpilot.core.memory.MemoryModel`."""
    n = memory.num_layers
    head = [m.name for m in memory.modules if m.layer == 0]
    if which == "top":
        return head + [m.name for m in memory.modules if m.layer == n]
    if which == "bottom":
        return [m.name for m in memory.modules if m.layer == 1]
    if which == "all":
        return [m.name for m in memory.modules]
    if which == "half":
        return head + [m.name for m in memory.modules if m.layer > n // 2]
    raise ValueError(f"unknown module subset {which!r}; choose from {', '.join(SUBSETS)}")


def _spec(batch: int, seq: int, classes: int, model: str | None) -> Any:
    from fedpilot.worker.model import ModelSpec

    return ModelSpec(
        model_path=model,
        num_labels=classes,
        lora_rank=8,
        lora_alpha=16,
        max_seq_len=seq,
        batch_size=batch,
    )


# --- the child: one worker task, metered from outside ----------------------------------


def _load_job(args: dict[str, Any]) -> tuple[Any, list[Any]]:
    """What a worker holds between tasks of a job: model, tokenizer and tokenized data."""
    from fedpilot.datasets import banking77_dir
    from fedpilot.worker.data import load_csv, make_batches, select
    from fedpilot.worker.model import load_model, load_tokenizer

    spec = _spec(args["batch"], args["seq"], args["classes"], args["model"])
    model = load_model(spec, device=args["device"], seed=0)
    data = select(
        load_csv(banking77_dir() / "train.csv"),
        classes=args["classes"],
        per_class=args["per_class"],
    )
    batches = make_batches(
        data, load_tokenizer(spec), batch_size=spec.batch_size, max_seq_len=spec.max_seq_len
    )
    return model, batches


def _task(model: Any, batches: list[Any], args: dict[str, Any]) -> dict[str, Any]:
    """One training task as the worker runs it: decode and load the adapter, IG probe,
    training with its loss evaluations, encode the update."""
    from fedpilot.core.aggregation import flatten, unflatten
    from fedpilot.wire.payload import decode_tensors, encode_tensors
    from fedpilot.worker.model import get_module_state, load_module_state
    from fedpilot.worker.scoring import local_ig_scores
    from fedpilot.worker.training import train

    adapter, _ = encode_tensors(flatten(get_module_state(model)))  # what a download holds
    load_module_state(model, unflatten(decode_tensors(adapter)))
    del adapter
    local_ig_scores(model, batches[:1], max_examples=16)
    result = train(model, args["modules"], batches, steps=args["steps"], loss_batches=4)
    _, manifest = encode_tensors(flatten(get_module_state(model, args["modules"])))
    return {
        "loss_before": result.loss_before,
        "loss_after": result.loss_after,
        "peak_bytes": result.peak_bytes,
        "update_bytes": manifest.total_bytes,
    }


def child_main() -> None:
    """Entry of the metered process: load the job, report ready (idle), run on "go"."""
    from fedpilot.worker.budget import import_runtime, tune_malloc, warm_up
    from fedpilot.worker.profiling import weight_bytes

    tune_malloc()
    import_runtime()
    import torch

    torch.set_num_threads(1)
    args = json.loads(sys.stdin.readline())
    model, batches = _load_job(args)
    warm_up(model, batches)
    print(json.dumps({"weight_bytes": weight_bytes(model)}), flush=True)
    sys.stdin.readline()
    print(json.dumps(_task(model, batches, args)), flush=True)


# --- the parent: profile, meter, compare -----------------------------------------------


def _metered_task(
    group: Any, args: dict[str, Any], timeout_s: float
) -> tuple[int, int, dict[str, Any]]:
    """(idle, peak) bytes of the cgroup around one child task, and its report; ``idle`` is
    the child at rest with the job loaded (warmed up), less the weights."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fedpilot.bench.memory import child_main; child_main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        group.add(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(args) + "\n")
        proc.stdin.flush()
        ready = proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"memory bench child failed to load the job (exit {proc.wait()})")
        idle = group.usage - int(json.loads(ready)["weight_bytes"])
        group.reset_max_usage()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        code = proc.wait(timeout=timeout_s)
        if code != 0 or not line:
            raise RuntimeError(f"memory bench child exited with {code}")
        return idle, group.max_usage, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(
    batches: Sequence[int] = (8, 16),
    seqs: Sequence[int] = (32, 64),
    subsets: Sequence[str] = ("top", "bottom", "all"),
    *,
    steps: int = 3,
    classes: int = 20,
    per_class: int = 8,
    model: str | None = None,
    timeout_s: float = 600,
) -> Iterator[dict[str, Any]]:
    """One JSON row per grid point, then a summary row."""
    import torch

    from fedpilot.worker.budget import HOST_RESERVE_BYTES, create_child_cgroup
    from fedpilot.worker.model import load_model
    from fedpilot.worker.profiling import dummy_batch, profile_memory

    device = "cpu"
    torch.set_num_threads(1)
    group = create_child_cgroup("fedpilot-bench-memory-")
    ratios: list[float] = []
    under = 0
    try:
        for batch in batches:
            for seq in seqs:
                spec = _spec(batch, seq, classes, model)
                peft_model = load_model(spec, device=device)
                memory = profile_memory(peft_model, dummy_batch(peft_model, batch, seq))
                del peft_model
                for which in subsets:
                    modules = subset_modules(memory, which)
                    args = {
                        "batch": batch,
                        "seq": seq,
                        "classes": classes,
                        "per_class": per_class,
                        "model": model,
                        "device": device,
                        "modules": modules,
                        "steps": steps,
                    }
                    start = time.perf_counter()
                    idle, peak, report = _metered_task(group, args, timeout_s)
                    baseline = idle + HOST_RESERVE_BYTES  # the budget's baseline
                    measured = peak - baseline
                    predicted = memory.cost(modules)
                    ratio = predicted / measured
                    ratios.append(ratio)
                    under += predicted < measured
                    yield {
                        "bench": "memory",
                        "device": device,
                        "batch": batch,
                        "seq": seq,
                        "modules": which,
                        "num_modules": len(modules),
                        "predicted_bytes": predicted,
                        "measured_bytes": measured,
                        "ratio": round(ratio, 4),
                        "baseline_bytes": baseline,
                        "above_idle_bytes": peak - idle,
                        "self_measured_step_bytes": report["peak_bytes"],
                        "loss_before": round(report["loss_before"], 4),
                        "loss_after": round(report["loss_after"], 4),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
    finally:
        group.remove()
    yield {
        "bench": "memory",
        "summary": True,
        "points": len(ratios),
        "under_predictions": under,
        "median_ratio": round(statistics.median(ratios), 4) if ratios else None,
        "max_ratio": round(max(ratios), 4) if ratios else None,
        "min_ratio": round(min(ratios), 4) if ratios else None,
        "meter": "cgroup memory.max_usage_in_bytes above the budget's baseline (idle with "
        "the job loaded, less the weights, plus the host reserve)",
        "host_reserve_bytes": HOST_RESERVE_BYTES,
    }
