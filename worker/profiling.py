"""Measure the memory model of DESIGN.md section 1 for one model, batch and device.

``cost(S) = M0 + sum_{l >= low(S)} a_l + sum_{m in S} (p_m + e_m)`` is filled as:

- ``M0`` = bytes of every parameter and buffer the worker holds (frozen base,
  every LoRA factor of the global adapter, the head) + the working set of one
  forward pass in training mode (dropout on), read from the allocator: on CUDA
  ``max_memory_allocated``, on CPU the torch profiler's allocation events.
  Holding all LoRA factors is why ``p_m`` below excludes the factors themselves.
- ``T(k)``: with no module trainable, the input of layer ``k`` is made a leaf
  that requires grad, and saved-tensor hooks count the bytes autograd keeps
  (deduplicated by storage, parameters excluded): ``T(k)`` is what
  back-propagating down to layer ``k`` keeps alive. ``a_l = T(l) - T(l + 1)``
  for ``l < L``.
- ``a_L`` is read from the allocator instead: the peak ``P`` of one
  forward + backward reaching only layer L, minus ``M0``. Saved activations
  and the forward working set overlap (the working set of a training forward
  *is* mostly saved tensors), so ``M0 + T(L)`` would count the overlap twice;
  ``P - M0`` charges it once, and every deeper ``low(S)`` adds the hook-counted
  ``a_l`` on top.
- ``e_m`` (LoRA module in layer k): saved bytes of the pass reaching layer k
  with ``m`` trainable, minus ``T(k)``: what autograd keeps only because ``m``
  trains (its ``lora_A`` input, the rank-r intermediate). For head-layer
  modules: saved bytes with only ``m`` trainable.
- ``p_m``: gradient bytes + AdamW state bytes, measured by stepping AdamW on
  zero tensors of the module's shapes on the same device.

The additive model is conservative: ``low(S)`` charges the whole lowest layer
although back-propagation may stop inside it, and modules reading the same
input (``query`` and ``value`` of one layer) each pay for it although autograd
keeps it once. :func:`measure_training_peak` measures a real optimizer step for
comparison.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost, memory_to_json
from fedpilot.worker.model import (
    ModelSpec,
    layer_stack,
    load_model,
    module_entries,
    num_layers,
    set_trainable,
)

Batch = Mapping[str, torch.Tensor]


# --- byte counting -----------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
    return sum(seen.values())


def weight_bytes(model: nn.Module) -> int:
    """Exact bytes of all parameters and buffers."""
    return unique_bytes([*model.parameters(), *model.buffers()])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


class SavedTensorCounter:
    """Counts bytes autograd saves for backward, each storage once, model weights excluded."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {k[0] for t in exclude if (k := _storage_key(t)) is not None}
        self._seen: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key[0] not in self._exclude:
            self._seen[key[0]] = max(self._seen.get(key[0], 0), key[1])
        # A detached alias, never ``t`` itself: a saved *output* returned as is would hold
        # its own grad_fn, a reference cycle through C++ that no collector frees (it
        # leaked every profiled forward, ~130 MiB each on MiniLM).
        return t.detach()

    @contextmanager
    def counting(self) -> Iterator[SavedTensorCounter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


@contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Hide the profiler's start/stop banner, which its C++ side writes straight to fd 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    """Peak of (allocated - freed) bytes while ``fn`` runs, from profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    results: Any = prof.profiler.kineto_results  # type: ignore[union-attr]
    cpu = torch.autograd.DeviceType.CPU  # type: ignore[attr-defined]
    events = [
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    events.sort(key=lambda x: x[0])
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- one training step ---------------------------------------------------------------


def optimizer_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer) -> float:
    """Forward, backward and optimizer step on one batch; returns the loss."""
    out = model(**batch)
    loss = out.loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_peak_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, fn: Callable[[], Any]
) -> int:
    """Peak bytes in use while ``fn`` runs one step.

    CUDA: ``max_memory_allocated`` (everything on the device). CPU: exact bytes
    already resident (weights, buffers, optimizer state, live gradients) plus
    the peak of new allocations recorded by the profiler during ``fn``.
    """
    device = _model_device(model)
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    resident = [*model.parameters(), *model.buffers()]
    resident += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        resident += _optimizer_tensors(optimizer)
    return unique_bytes(resident) + _cpu_allocation_peak(fn)


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore trainable flags, train/eval mode and trainable values after profiling."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def measure_training_peak(
    model: nn.Module,
    modules: Iterable[str],
    batch: Batch,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
) -> int:
    """Actual peak bytes of a steady-state AdamW step training exactly ``modules``.

    One warm-up step creates the optimizer state, then the second step is
    measured with :func:`step_peak_bytes`. Parameters are restored afterwards,
    so the model is unchanged. Compare with ``MemoryModel.cost(modules)``.
    """
    modules = list(modules)
    with _preserved(model):
        params = set_trainable(model, modules)
        backup = [p.detach().clone() for p in params]
        model.train()
        if not params:
            with torch.no_grad():
                return step_peak_bytes(model, None, lambda: model(**batch))
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        try:
            optimizer_step(model, batch, optimizer)
            return step_peak_bytes(
                model, optimizer, lambda: optimizer_step(model, batch, optimizer)
            )
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)


# --- the memory model ----------------------------------------------------------------


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return layer_stack(model)[1]


def _make_input_leaf(
    _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        args = (args[0].detach().requires_grad_(True), *args[1:])
    else:
        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
    return args, kwargs


@contextmanager
def _input_leaf(model: nn.Module, layer: int | None) -> Iterator[None]:
    """Make the input of ``layer`` (1-based) a leaf that requires grad, so backward reaches it."""
    if layer is None:
        yield
        return
    handle = _layer_list(model)[layer - 1].register_forward_pre_hook(
        _make_input_leaf, with_kwargs=True
    )
    try:
        yield
    finally:
        handle.remove()


def _saved_bytes(
    model: nn.Module, batch: Batch, trainable: Iterable[str], input_layer: int | None = None
) -> int:
    """Bytes autograd keeps for one forward with ``trainable`` modules (and optionally
    the input of layer ``input_layer`` requiring grad)."""
    set_trainable(model, trainable)
    counter = SavedTensorCounter(exclude=[*model.parameters(), *model.buffers()])
    with _input_leaf(model, input_layer), torch.random.fork_rng(devices=[]), counter.counting():
        torch.manual_seed(0)
        out = model(**batch)
    del out
    return counter.bytes


def _backward_peak(model: nn.Module, batch: Batch, input_layer: int) -> int:
    """Allocator peak of forward + backward reaching layer ``input_layer``, nothing trainable."""
    set_trainable(model, [])

    def run() -> None:
        out = model(**batch)
        out.loss.backward()

    with _input_leaf(model, input_layer):
        return step_peak_bytes(model, None, run)


def _forward_working_set(model: nn.Module, batch: Batch) -> int:
    """Peak bytes allocated by one no-grad forward beyond what is already resident."""
    device = _model_device(model)
    with torch.no_grad():
        model(**batch)  # warm-up: lazy allocations happen once
        if not _is_cuda(device):
            return _cpu_allocation_peak(lambda: model(**batch))
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(**batch)
        torch.cuda.synchronize(device)
        return max(0, int(torch.cuda.max_memory_allocated(device)) - base)


def _param_state_bytes(params: list[nn.Parameter]) -> int:
    """Gradient + AdamW state bytes for ``params``, by stepping AdamW on zero copies."""
    if not params:
        return 0
    clones = [torch.zeros_like(p, requires_grad=True) for p in params]
    for c in clones:
        c.grad = torch.zeros_like(c)
    optimizer = torch.optim.AdamW(clones, lr=1e-3)
    optimizer.step()
    device = params[0].device
    state = [t for t in _optimizer_tensors(optimizer) if t.device == device]
    return unique_bytes([c.grad for c in clones if c.grad is not None]) + unique_bytes(state)


def _rows(batch: Batch, n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in batch.items()}


def _affine(one: int, two: int, rows: int) -> int:
    """The value at ``rows`` of the line through (1, ``one``) and (2, ``two``), never below
    either measurement."""
    return max(one, two, one + (rows - 1) * (two - one))


def profile_memory(model: nn.Module, batch: Batch, *, micro_batches: bool = True) -> MemoryModel:
    """Measure ``M0``, ``a_l``, ``p_m`` and ``e_m`` for ``model`` on ``batch`` (see module doc).

    ``batch`` must have the job's batch size and sequence length and include
    ``labels``. The model's flags and mode are restored afterwards.

    With ``micro_batches`` (the default) the model is measured on the first one
    and the first two rows of ``batch`` and every activation term is extended
    along that line to the full batch: every saved or working tensor of a
    transformer has the batch as its leading dimension, so the terms are affine
    in it (checked against the direct measurement in the tests). Profiling then
    needs the weights plus two rows' activations, so a worker whose budget fits
    only the top of the model can still profile; a direct measurement holds
    the activations of back-propagating the whole batch to the first layer.
    """
    rows = int(next(iter(batch.values())).shape[0])
    if not micro_batches or rows <= 2:
        return _profile_at(model, batch)
    one, two = _profile_at(model, _rows(batch, 1)), _profile_at(model, _rows(batch, 2))
    weights = weight_bytes(model)
    return MemoryModel(
        base_bytes=weights + _affine(one.base_bytes - weights, two.base_bytes - weights, rows),
        layer_activation_bytes=tuple(
            _affine(a, b, rows)
            for a, b in zip(one.layer_activation_bytes, two.layer_activation_bytes, strict=True)
        ),
        modules=tuple(
            ModuleCost(
                a.name,
                a.layer,
                max(a.param_bytes, b.param_bytes),
                _affine(a.extra_bytes, b.extra_bytes, rows),
            )
            for a, b in zip(one.modules, two.modules, strict=True)
        ),
    )


def _profile_at(model: nn.Module, batch: Batch) -> MemoryModel:
    """The memory model measured directly on ``batch``."""
    entries = module_entries(model)
    n = num_layers(model)
    with _preserved(model):
        model.train()
        base = weight_bytes(model) + _forward_working_set(model, batch)
        reach = [0] * (n + 2)  # reach[k] = T(k), reach[n + 1] = 0
        for k in range(n, 0, -1):
            reach[k] = max(_saved_bytes(model, batch, [], input_layer=k), reach[k + 1])
        activations = [reach[k] - reach[k + 1] for k in range(1, n + 1)]
        activations[-1] = max(0, _backward_peak(model, batch, n) - base)
        costs = []
        for name, e in entries.items():
            if e.layer == HEAD_LAYER:
                extra = _saved_bytes(model, batch, [name])
            else:
                extra = _saved_bytes(model, batch, [name], input_layer=e.layer) - reach[e.layer]
            param = _param_state_bytes(list(e.params().values()))
            costs.append(ModuleCost(name, e.layer, param, max(0, extra)))
    return MemoryModel(
        base_bytes=base, layer_activation_bytes=tuple(activations), modules=tuple(costs)
    )


# --- JSON and command ----------------------------------------------------------------


def dummy_batch(
    model: nn.Module, batch_size: int, seq_len: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random full-size batch for the model's task (token ids, or pixels at the model's
    image size, with labels): memory depends on shapes, not content."""
    from fedpilot.worker.tasks import task_dummy_batch

    return task_dummy_batch(model, batch_size, seq_len, seed=seed)


def run_profile_command(
    model: str | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    rank: int = 8,
    *,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] = ("query", "value"),
    num_labels: int = 2,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    task: str = "sequence-classification",
) -> dict[str, Any]:
    """Profile a model configuration on ``device`` and return the ``fedpilot plan`` JSON.

    ``model`` is a local model directory (``None``: the bundled MiniLM);
    ``alpha`` defaults to ``2 * rank``; ``task`` picks the model class (and, for
    image classification, batches of the model's image size: ``seq_len`` is unused).
    """
    spec = ModelSpec(
        model_path=model,
        num_labels=num_labels,
        lora_rank=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=tuple(target_modules),
        dtype=dtype,
        max_seq_len=seq_len,
        batch_size=batch_size,
        task=task,
    )
    peft_model = load_model(spec, device=device, seed=seed)
    batch = dummy_batch(peft_model, batch_size, seq_len, seed=seed)
    return memory_to_json(profile_memory(peft_model, batch))
