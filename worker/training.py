"""Local training of the assigned modules, and evaluation.

Only the assigned modules' tensors reach the optimizer; every other LoRA
module stays in the forward pass, frozen at its global value, so the update is
relative to the global model the coordinator holds.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedpilot.worker.model import set_trainable
from fedpilot.worker.profiling import Batch, optimizer_step, step_peak_bytes

IGNORE_INDEX = -100
"""A label that does not count (prompt and padding tokens of a causal LM)."""


@dataclass(frozen=True)
class TrainResult:
    loss_before: float
    loss_after: float
    num_samples: int
    seconds: float
    peak_bytes: int
    steps: int


def _batch_size(batch: Batch) -> int:
    return int(batch["labels"].shape[0])


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _scored(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels that count and the mask selecting them. Per-token labels (a causal LM) are
    shifted as HF shifts them: position t is predicted from the tokens before it."""
    labels = batch["labels"]
    if labels.dim() == 2:
        labels = labels[:, 1:]
    return labels, labels != IGNORE_INDEX


def evaluate(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, in eval mode (no dropout).

    Classification: per example. Causal LM (labels per token): per response token
    (labels ``-100`` do not count), accuracy of the next-token prediction; the
    perplexity is ``exp`` of the loss.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = _to(batch, device)
                out = model(**batch)
                labels, counted = _scored(batch)
                logits = out.logits[:, :-1] if batch["labels"].dim() == 2 else out.logits
                k = int(counted.sum())
                total_loss += float(out.loss) * k
                correct += int(((logits.argmax(-1) == labels) & counted).sum())
                n += k
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no examples to evaluate")
    return total_loss / n, correct / n


def train(
    model: nn.Module,
    modules: Iterable[str],
    batches: Sequence[Batch],
    *,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    measure_peak: bool = True,
    loss_batches: int | None = None,
) -> TrainResult:
    """Train exactly ``modules`` with AdamW; ``steps`` (if given) overrides ``epochs``.

    ``loss_batches`` limits the before/after loss to the first batches: a full
    pass over local data can cost more than the training itself.

    ``num_samples`` is the number of local examples (the aggregation weight).
    Batches are visited in a seeded shuffled order, epoch after epoch. The
    losses before and after are :func:`evaluate` on ``batches``. ``peak_bytes``
    is ``max_memory_allocated`` over the run on CUDA; on CPU one steady-state
    step (the second) is measured with the profiler, 0 when not measured.
    """
    if not batches:
        raise ValueError("no training batches")
    device = next(model.parameters()).device
    batches = [_to(b, device) for b in batches]
    params = set_trainable(model, modules)
    total = steps if steps is not None else epochs * len(batches)
    if total < 0:
        raise ValueError("steps must be >= 0")
    num_samples = sum(_batch_size(b) for b in batches)
    probe = batches[:loss_batches] if loss_batches else batches
    loss_before = evaluate(model, probe)[0]
    if not params or total == 0:
        return TrainResult(loss_before, loss_before, num_samples, 0.0, 0, 0)

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    peak = 0
    cuda = device.type == "cuda"
    measured_step = min(1, total - 1)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    if cuda and measure_peak:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(total):
            if not order:
                order = list(range(len(batches)))
                rng.shuffle(order)
            batch = batches[order.pop()]
            if measure_peak and not cuda and step == measured_step:
                step_fn = functools.partial(optimizer_step, model, batch, optimizer)
                peak = step_peak_bytes(model, optimizer, step_fn)
            else:
                optimizer_step(model, batch, optimizer)
    seconds = time.perf_counter() - start
    if cuda and measure_peak:
        peak = int(torch.cuda.max_memory_allocated(device))
    model.train(was_training)
    loss_after = evaluate(model, probe)[0]
    return TrainResult(
        loss_before=loss_before,
        loss_after=loss_after,
        num_samples=num_samples,
        seconds=seconds,
        peak_bytes=peak,
        steps=total,
    )
