"""Local IG score of each module (DESIGN.md section 2): an empirical-Fisher estimate.

``local_m = mean over probe examples of ||grad_m loss(x)||^2``, the squared
gradient norm of module ``m``'s tensors (LoRA factors, or the head's weights)
for one example at a time. The trace of the empirical Fisher restricted to
``m`` bounds how much one small step on ``m`` can lower the local loss.

The probe must fit any worker that can hold the model, so it runs micro-batch 1
with gradient checkpointing (layers recompute activations in backward instead
of keeping them), and in a deterministic mode: dropout off everywhere except
that checkpointed layers keep the ``training`` flag HF requires to checkpoint.
Every flag it touches is restored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from fedpilot.worker.model import module_entries, set_trainable
from fedpilot.worker.profiling import Batch


def _hf_model(model: nn.Module) -> Any:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _checkpointing_on(hf: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())


def _set_checkpointing(hf: Any, on: bool) -> None:
    """Non-reentrant checkpointing: works with frozen embeddings (no input needs grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.activation_checkpointing_disable()
    elif on:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_disable()


@contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """All modules trainable, checkpointing on, dropout off; everything restored on exit."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {m: m.training for m in model.modules()}
    hf = _hf_model(model)
    was_checkpointing = _checkpointing_on(hf)
    can_checkpoint = bool(getattr(hf, "supports_gradient_checkpointing", False))
    # Enabling checkpointing also hooks the input embeddings so their output
    # requires grad; left behind, that hook makes every later training step
    # back-propagate through all layers, the cost the depth-aware budget avoids.
    hooks = {m: set(m._forward_hooks) for m in model.modules()}
    try:
        set_trainable(model, module_entries(model))
        if can_checkpoint and not was_checkpointing:
            _set_checkpointing(hf, True)
        model.train()
        for m in model.modules():
            if not getattr(m, "gradient_checkpointing", False):
                m.training = False
        yield
    finally:
        model.zero_grad(set_to_none=True)
        if can_checkpoint and not was_checkpointing:
            _set_checkpointing(hf, False)
        for m, before in hooks.items():
            for hook_id in set(m._forward_hooks) - before:
                m._forward_hooks.pop(hook_id, None)
        for m, mode in modes.items():
            m.training = mode
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _examples(batch: Batch) -> Iterator[Batch]:
    """Single examples, trimmed to their attention mask (exact for right padding); per-token
    labels (a causal LM) are trimmed with the tokens. An example whose labels all are
    ``-100`` has no loss and is skipped."""
    n = int(batch["labels"].shape[0])
    mask = batch.get("attention_mask")
    for i in range(n):
        length = int(mask[i].sum()) if mask is not None else None
        ex: dict[str, torch.Tensor] = {}
        for k, v in batch.items():
            v = v[i : i + 1]
            if length is not None and v.dim() == 2 and v.shape[1] == mask.shape[1]:
                v = v[:, :length]
            ex[k] = v
        if ex["labels"].dim() == 2 and not bool((ex["labels"][:, 1:] != -100).any()):
            continue
        yield ex


def local_ig_scores(
    model: nn.Module, batches: Iterable[Batch], *, max_examples: int | None = None
) -> dict[str, float]:
    """Mean squared per-example gradient norm of every module over the probe batches.

    ``max_examples`` caps the probe. Returns ``{module: score}`` for every
    module, all finite and >= 0.
    """
    entries = module_entries(model)
    device = next(model.parameters()).device
    totals = dict.fromkeys(entries, 0.0)
    count = 0
    with _probe_mode(model):
        examples = (ex for batch in batches for ex in _examples(batch))
        for ex in itertools.islice(examples, max_examples):
            ex = {k: v.to(device) for k, v in ex.items()}
            model.zero_grad(set_to_none=True)
            model(**ex).loss.backward()
            for name, e in entries.items():
                totals[name] += sum(
                    float(p.grad.detach().float().pow(2).sum())
                    for p in e.params().values()
                    if p.grad is not None
                )
            count += 1
    if count == 0:
        raise ValueError("no probe examples")
    scores = {name: total / count for name, total in totals.items()}
    for name, s in scores.items():
        if not math.isfinite(s):
            raise FloatingPointError(f"non-finite IG score for module {name!r}")
    return scores
