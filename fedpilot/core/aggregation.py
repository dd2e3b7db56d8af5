"""Server-side merging of uneven module updates (DESIGN.md section 3).

A *module* is a small dict of named tensors: a LoRA module has ``lora_A``
(``r x in``) and ``lora_B`` (``out x r``); the task head has its full weights.
Clients send only the modules they trained.

- **STAgg** (``rule="stagg"``): module ``m`` is averaged over the clients that
  trained it, weighted by sample counts; then the global module moves toward
  that average by a step ``eta_m`` that grows for under-updated modules (DWA):
  ``W <- W + eta_m (Agg - W)``, ``eta_m = eta * clip((u_mean / u_m) ** gamma, 1, eta_max)``.
  Two refinements, on by default since the multi-seed runs in
  docs/benchmarks.md, keep the step inside the clients' hull and damp modules
  few participants trained: ``convex`` caps ``eta_m`` at 1, and ``coverage``
  multiplies it by the share of this round's samples whose clients trained
  the module (with ``gamma=0`` that is FedAvg's stale blend). Both off is the
  paper's step.
  ``staleness`` makes the step depend on how many rounds the module went untrained
  (a temporal term: positive catches a lagging module up, negative damps it).
- **Server momentum** (``momentum=beta``, either rule, ``factors`` merge): each
  aggregated module also moves by ``beta`` times its last global change,
  ``W' = W + step (Agg - W) + beta (W - W_prev)``, the heavy-ball form of
  FedAvgM (Hsu et al., 2019) whose only state is the previous global adapter,
  which the coordinator keeps anyway. A module nobody trains this round stays
  where it is, so its momentum starts again from zero. With ``restart``, a
  module whose step this round points against its last change
  (``<step, W - W_prev> < 0``) takes no momentum this round: the gradient
  restart of O'Donoghue and Candes (2015), which stops the heavy ball from
  carrying a module past the clients' consensus when they turn it back.
- **FedAvg** (``rule="fedavg"``): the baseline; every participant counts for
  every module, and one that did not train ``m`` contributes the stale global value.

``merge="factors"`` averages ``A`` and ``B`` separately; ``merge="exact"``
averages the products ``B_i A_i`` and re-factorises with a truncated SVD.

:class:`Aggregator` consumes updates one at a time and keeps only one
accumulator per module, so memory does not grow with the number of clients.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np

from fedpilot.core.ig_score import (
    DEFAULT_EMA_DECAY,
    ModuleStats,
    relative_change,
    update_global_scores,
)

LORA_A = "lora_A"
LORA_B = "lora_B"

Module = Mapping[str, np.ndarray]
"""Named tensors of one module, e.g. ``{"lora_A": A, "lora_B": B}``."""

SEPARATOR = "/"


def tensor_key(module: str, part: str) -> str:
    """Flat name of one tensor of a module, as it travels and is stored: ``module/part``."""
    return f"{module}{SEPARATOR}{part}"


def flatten(modules: Mapping[str, Module]) -> dict[str, np.ndarray]:
    return {tensor_key(m, p): x for m, parts in modules.items() for p, x in parts.items()}


def unflatten(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`flatten`; raises ValueError on a name without a module part."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, x in tensors.items():
        module, sep, part = key.rpartition(SEPARATOR)
        if not sep or not module or not part:
            raise ValueError(f"tensor name {key!r} is not 'module{SEPARATOR}tensor'")
        out.setdefault(module, {})[part] = x
    return out


class Rule(StrEnum):
    STAGG = "stagg"
    FEDAVG = "fedavg"


class Merge(StrEnum):
    FACTORS = "factors"
    EXACT = "exact"


class UpdateError(ValueError):
    """A client update that does not fit the global adapter; nothing of it was used."""


@dataclass(frozen=True)
class DwaConfig:
    """Server step of STAgg. ``eta=1, gamma=0`` makes STAgg plain per-module averaging."""

    eta: float = 1.0
    gamma: float = 0.5
    eta_max: float = 2.0
    convex: bool = True
    """Cap ``eta_m`` at 1, so the new value stays between the old one and the aggregate."""
    coverage: bool = True
    """Scale ``eta_m`` by the share of the round's samples that trained the module: a module
    averaged over a few skewed clients moves only as far as their share of the round."""
    staleness: float = 0.0
    """Multiply ``eta_m`` by ``(1 + s_m) ** staleness``, ``s_m`` the rounds the module went
    untrained before this one (clipped with the boost at ``eta_max``). Positive: a module
    that lagged catches up with the rest of the model; negative: an aggregate arriving
    after a long gap (from the few clients that could train it) moves it less."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eta <= 10.0:
            raise ValueError(f"eta must be in (0, 10], got {self.eta}")
        if not 0.0 <= self.gamma <= 10.0:
            raise ValueError(f"gamma must be in [0, 10], got {self.gamma}")
        if not 1.0 <= self.eta_max <= 100.0:
            raise ValueError(f"eta_max must be in [1, 100], got {self.eta_max}")
        if not -4.0 <= self.staleness <= 4.0:
            raise ValueError(f"staleness must be in [-4, 4], got {self.staleness}")

    def step(
        self, count: int, mean_count: float, share: float = 1.0, rounds_stale: int = 0
    ) -> float:
        """``eta_m`` for a module with ``count`` updates when modules average ``mean_count``;
        ``share`` is the fraction of the round's samples from clients that trained it and
        ``rounds_stale`` the rounds it went untrained before this one."""
        boost = math.pow(mean_count / count, self.gamma) if count > 0 else self.eta_max
        ratio = max(boost, 1.0) * math.pow(1.0 + max(rounds_stale, 0), self.staleness)
        step = self.eta * min(ratio, self.eta_max)
        if self.coverage:
            step *= min(max(share, 0.0), 1.0)
        return min(step, 1.0) if self.convex else step


@dataclass(frozen=True)
class Packed:
    """An update's tensors back to back in one 1-D array, in the order of ``keys``.

    What a decoded payload already is: the aggregator folds it in with a few
    large operations and checks its structure once per distinct layout, not
    once per tensor per client (adapters have hundreds of small tensors).
    """

    keys: tuple[str, ...]
    """Flat tensor names (``module/part``), in storage order."""
    shapes: tuple[tuple[int, ...], ...]
    values: np.ndarray
    """1-D floating array holding every tensor, ``keys[0]`` first."""

    @property
    def layout(self) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
        return self.keys, self.shapes


@dataclass(frozen=True)
class ClientUpdate:
    """The modules one client trained this round and how many samples it trained on.

    Give either ``modules`` or ``packed`` (then ``modules`` stays empty).
    """

    client: str
    num_samples: int
    modules: Mapping[str, Module] = field(default_factory=dict)
    packed: Packed | None = None
    finite: bool = False
    """The values were already checked finite (the payload receiver does), so the
    aggregator does not scan them again."""


@dataclass(frozen=True)
class AggregationResult:
    """New global modules (every module, trained or not) and the bookkeeping behind them."""

    modules: dict[str, dict[str, np.ndarray]]
    stats: dict[str, ModuleStats]
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per aggregated module: client -> weight (FedAvg adds ``"<stale>"`` for the global value)."""
    steps: dict[str, float] = field(default_factory=dict)
    """Per aggregated module: the server step ``eta_m`` used."""
    changes: dict[str, float] = field(default_factory=dict)
    """Per aggregated module: relative change of ``B A`` (or of the weights)."""
    restarted: tuple[str, ...] = ()
    """Modules whose server momentum was dropped this round (``restart``)."""


def is_lora(module: Module) -> bool:
    return LORA_A in module and LORA_B in module


def product(module: Module) -> np.ndarray:
    """``B @ A`` in float32 (float64 if the factors are)."""
    dtype = np.result_type(module[LORA_B].dtype, module[LORA_A].dtype, np.float32)
    out: np.ndarray = np.asarray(module[LORA_B], dtype=dtype) @ np.asarray(
        module[LORA_A], dtype=dtype
    )
    return out


def product_changes(pairs: list[tuple[Module, Module]]) -> list[tuple[float, float]]:
    """``||B'A' - BA||_F^2`` and ``||B'A'||_F^2`` of many (before, after) LoRA modules,
    without forming any product.

    Only rank x rank Gram matrices are formed (``<B1 A1, B2 A2>_F =
    trace((B1^T B2)(A2 A1^T))``), so scoring a 4096 x 4096 module costs
    kilobytes, not 64 MiB. The change is expanded as ``B' dA + dB A`` rather
    than as a difference of two large norms, so float32 Grams lose nothing to
    cancellation when the change is small. One module at a time: seven small
    BLAS products each, 2.4x faster than stacking modules of one shape into
    batched products (the stacks were copies, and batched products of
    transposed views leave BLAS).
    """
    out: list[tuple[float, float]] = []
    for before, after in pairs:
        a0, b0 = _float(before[LORA_A]), _float(before[LORA_B])
        a1, b1 = _float(after[LORA_A]), _float(after[LORA_B])
        da, db = a1 - a0, b1 - b0
        g_b1 = _f64(b1.T @ b1)
        # ||B1 dA||^2 + ||dB A0||^2 + 2 <B1 dA, dB A0>, each trace(X Y) as sum(X * Y^T)
        delta = (
            np.vdot(g_b1, _f64(da @ da.T))
            + np.vdot(_f64(db.T @ db), _f64(a0 @ a0.T))
            + 2.0 * np.vdot(_f64(b1.T @ db), _f64(da @ a0.T))
        )
        norm = np.vdot(g_b1, _f64(a1 @ a1.T))
        out.append((max(float(delta), 0.0), max(float(norm), 0.0)))
    return out


def _float(x: np.ndarray) -> np.ndarray:
    """At least float32 (bfloat16 and float16 factors are scored in float32)."""
    return x if x.dtype.itemsize >= 4 else x.astype(np.float32)


def _f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def refactorise(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD ``W ~ B A`` with ``A = V_r^T`` (orthonormal rows) and ``B = U_r S_r``.

    Orthonormal ``A`` keeps a zero or low-rank product trainable: LoRA's
    gradient with respect to ``B`` is proportional to ``A``, so ``A`` must
    never collapse to zero, which a balanced ``sqrt(S)`` split would do.
    Large matrices use a seeded randomized range finder with power iterations
    (Halko et al.): exact when ``W`` has rank <= ``rank`` + oversampling and
    orders of magnitude faster than a full SVD of a 3072 x 768 product.
    """
    u, s, vt = _truncated_svd(w, rank)
    r = min(rank, s.shape[0])
    b = np.zeros((w.shape[0], rank), dtype=w.dtype)
    a = np.zeros((rank, w.shape[1]), dtype=w.dtype)
    b[:, :r] = u[:, :r] * s[:r]
    a[:r] = vt[:r]
    return a, b


def _truncated_svd(
    w: np.ndarray, rank: int, oversample: int = 10, power_iterations: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = rank + oversample
    if min(w.shape) <= 2 * k:
        return np.linalg.svd(w, full_matrices=False)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(w @ rng.standard_normal((w.shape[1], k)).astype(w.dtype))
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    u_small, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u_small, s, vt


_BLOCK = 1 << 18
"""Elements weighted per step: 1 MiB of float32, inside L2 (best measured on 1-2 MiB L2)."""


FOLD_THREADS = min(4, os.cpu_count() or 1)
"""Default threads per fold: memory bandwidth, not cores, bounds it beyond a few."""
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _fold_pool() -> ThreadPoolExecutor:
    """One process-wide pool for the fold's helper threads, made on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, FOLD_THREADS - 1), thread_name_prefix="fold")
        return _POOL


class _BufferPool:
    """Zeroed 1-D buffers reused from round to round.

    A first touch of fresh memory costs the kernel a zeroed page per 4 KiB: on
    the measured machine 10 ms for a 5.3 MB accumulator, more than folding ten
    updates into it. A coordinator aggregates one round after another, so the
    accumulator and scratch blocks of the last round are kept (a few, bounded)
    and handed to the next one.
    """

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int, dtype: np.dtype, *, zero: bool = True) -> np.ndarray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.size == size and buf.dtype == dtype:
                    del self._free[i]
                    break
            else:
                return np.zeros(size, dtype=dtype)
        if zero:
            buf.fill(0)
        return buf

    def give(self, *buffers: np.ndarray) -> None:
        with self._lock:
            self._free.extend(buffers)
            del self._free[: max(0, len(self._free) - self._keep)]


_BUFFERS = _BufferPool()


@dataclass(frozen=True)
class _Plan:
    """Where a packed layout's values go, checked once per layout."""

    size: int
    runs: tuple[tuple[int, int, int], ...]
    """(accumulator start, source start, length), adjacent stretches merged."""
    exact: tuple[tuple[str, tuple[tuple[str, tuple[int, tuple[int, ...]]], ...]], ...]
    """Modules merged as products: name, (part, (offset, shape)) pairs."""
    modules: tuple[str, ...]
    spans: tuple[tuple[str, int, int], ...]
    """(flat name, offset, size) of every tensor, to name a non-finite one."""


def _root(x: np.ndarray) -> np.ndarray:
    while isinstance(x.base, np.ndarray):
        x = x.base
    return x


def _address(x: np.ndarray) -> int:
    address: int = x.__array_interface__["data"][0]
    return address


class Aggregator:
    """Streaming STAgg / FedAvg over client updates for one round."""

    def __init__(
        self,
        global_modules: Mapping[str, Module],
        stats: Mapping[str, ModuleStats],
        round_number: int,
        *,
        rule: Rule | str = Rule.STAGG,
        merge: Merge | str = Merge.FACTORS,
        dwa: DwaConfig | None = None,
        ema_decay: float = DEFAULT_EMA_DECAY,
        fold_threads: int = FOLD_THREADS,
        momentum: float = 0.0,
        previous: Mapping[str, Module] | None = None,
        restart: bool = False,
    ) -> None:
        """``fold_threads``: threads that fold one update in (1 = the calling thread only);
        an adapter smaller than two blocks always folds in one. ``momentum`` in [0, 1)
        with ``previous``, the global adapter one version before ``global_modules``
        (none in the first round: no momentum yet); ``restart`` drops it for a
        module whose step turns against its last change."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum and Merge(merge) is Merge.EXACT:
            raise ValueError(
                "momentum needs merge='factors': re-factorised factors have no "
                "meaningful difference between versions"
            )
        self._momentum = momentum
        self._previous = previous if momentum else None
        self._restart = restart
        self._global = global_modules
        self._stats = dict(stats)
        self._round = round_number
        self._rule = Rule(rule)
        self._merge = Merge(merge)
        self._dwa = dwa or DwaConfig()
        self._decay = ema_decay
        self._samples: dict[str, dict[str, int]] = {}
        self._clients: set[str] = set()
        self._total_samples = 0
        # Tensors averaged element-wise share one flat accumulator in a fixed
        # order, so folding in an update is a few large array operations
        # rather than several per tensor (adapters have hundreds of small ones).
        self._slots: dict[tuple[str, str], tuple[int, int]] = {}
        size = 0
        # Slots follow the order of flat tensor names, which is also the order in
        # which a payload stores them, so decoded updates fold in as one stretch.
        factor_keys = sorted(
            (
                (name, part)
                for name, m in global_modules.items()
                if not self._exact(m)
                for part in m
            ),
            key=lambda k: tensor_key(*k),
        )
        for name, part in factor_keys:
            n = global_modules[name][part].size
            self._slots[(name, part)] = (size, n)
            size += n
        dtypes = [x.dtype for m in global_modules.values() for x in m.values()]
        dtype = np.result_type(np.float32, *dtypes)
        self._flat = _BUFFERS.take(size, dtype)
        self._products: dict[str, ProductSum] = {}
        threads = min(fold_threads, max(1, size // _BLOCK))
        block = min(_BLOCK, max(1, size))
        self._scratches = [_BUFFERS.take(block, dtype, zero=False) for _ in range(threads)]
        # The buffers go back to the pool with the aggregator: nothing returned by
        # result() is a view of them.
        weakref.finalize(self, _BUFFERS.give, self._flat, *self._scratches)
        self._plans: dict[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]], _Plan] = {}

    def _exact(self, module: Module) -> bool:
        return self._merge is Merge.EXACT and is_lora(module)

    def _check(self, update: ClientUpdate) -> None:
        """Structure of the update: names, tensor sets, shapes, dtypes (values come later)."""
        self._check_client(update)
        for name, parts in update.modules.items():
            where = f"client {update.client!r}, module {name!r}"
            reference = self._global.get(name)
            if reference is None:
                raise UpdateError(f"{where}: not a module of the global adapter")
            if parts.keys() != reference.keys():
                raise UpdateError(
                    f"{where}: tensors {sorted(parts)} do not match {sorted(reference)}"
                )
            for part, x in parts.items():
                ref = reference[part]
                if x.shape != ref.shape:
                    raise UpdateError(f"{where}, {part}: shape {x.shape} != expected {ref.shape}")
                if x.dtype.kind != "f":
                    raise UpdateError(f"{where}, {part}: dtype {x.dtype} is not floating point")

    def _require_finite(self, update: ClientUpdate, keys: Iterable[tuple[str, str]]) -> None:
        for name, part in keys:
            if not np.isfinite(update.modules[name][part]).all():
                raise UpdateError(
                    f"client {update.client!r}, module {name!r}, {part}: contains NaN or Inf"
                )

    def add(self, update: ClientUpdate) -> None:
        """Fold one client's update in; raises :class:`UpdateError` and changes nothing if bad."""
        if update.packed is not None:
            self._add_packed(update, update.packed)
            return
        self._check(update)
        keys = sorted(
            (
                (name, part)
                for name, parts in update.modules.items()
                if not self._exact(parts)
                for part in parts
            ),
            key=lambda k: tensor_key(*k),
        )
        runs = self._runs(update, keys)
        # One summation pass per stretch finds NaN/Inf (a non-finite sum); only
        # then look tensor by tensor, to name the culprit or clear an overflow.
        if not update.finite and any(not np.isfinite(src.sum()) for _, src in runs):
            self._require_finite(update, keys)
        products: dict[str, Module] = {}
        for name, parts in update.modules.items():
            if self._exact(parts):
                if not update.finite:
                    self._require_finite(update, [(name, p) for p in parts])
                products[name] = parts
        # Validated: from here on nothing can fail half-way.
        self._fold(runs, products, update.num_samples)
        self._record(update.client, update.num_samples, update.modules)

    def _add_packed(self, update: ClientUpdate, packed: Packed) -> None:
        where = f"client {update.client!r}"
        if update.modules:
            raise UpdateError(f"{where}: give modules or packed values, not both")
        self._check_client(update)
        plan = self._plans.get(packed.layout)
        if plan is None:
            plan = self._plan(where, packed)
            self._plans[packed.layout] = plan
        values = packed.values
        if values.ndim != 1 or values.size != plan.size:
            raise UpdateError(
                f"{where}: packed values have shape {values.shape}, the layout needs ({plan.size},)"
            )
        if values.dtype.kind != "f":
            raise UpdateError(f"{where}: dtype {values.dtype} is not floating point")
        if not update.finite and not np.isfinite(values.sum()):
            for key, offset, size in plan.spans:
                if not np.isfinite(values[offset : offset + size]).all():
                    module, _, part = key.rpartition(SEPARATOR)
                    raise UpdateError(f"{where}, module {module!r}, {part}: contains NaN or Inf")
        products: dict[str, Module] = {
            name: {part: values[o : o + int(np.prod(sh))].reshape(sh) for part, (o, sh) in parts}
            for name, parts in plan.exact
        }
        runs = [(start, values[src : src + length]) for start, src, length in plan.runs]
        self._fold(runs, products, update.num_samples)
        self._record(update.client, update.num_samples, plan.modules)

    def _plan(self, where: str, packed: Packed) -> _Plan:
        """Check a layout against the global adapter once; where each stretch goes."""
        if len(packed.keys) != len(packed.shapes):
            raise UpdateError(f"{where}: {len(packed.keys)} names for {len(packed.shapes)} shapes")
        found: dict[str, dict[str, tuple[int, tuple[int, ...]]]] = {}
        spans, offset = [], 0
        for key, shape in zip(packed.keys, packed.shapes, strict=True):
            name, sep, part = key.rpartition(SEPARATOR)
            if not sep or not name or not part:
                raise UpdateError(f"{where}: tensor name {key!r} is not 'module{SEPARATOR}tensor'")
            reference = self._global.get(name)
            if reference is None:
                raise UpdateError(f"{where}, module {name!r}: not a module of the global adapter")
            ref = reference.get(part)
            if ref is None or part in found.get(name, {}):
                raise UpdateError(f"{where}, module {name!r}: unexpected or repeated {part!r}")
            if tuple(shape) != ref.shape:
                raise UpdateError(
                    f"{where}, module {name!r}, {part}: "
                    f"shape {tuple(shape)} != expected {ref.shape}"
                )
            found.setdefault(name, {})[part] = (offset, ref.shape)
            spans.append((key, offset, ref.size))
            offset += ref.size
        runs: list[tuple[int, int, int]] = []
        exact = []
        for name, parts in found.items():
            if parts.keys() != self._global[name].keys():
                raise UpdateError(
                    f"{where}, module {name!r}: tensors {sorted(parts)} do not match "
                    f"{sorted(self._global[name])}"
                )
            if self._exact(self._global[name]):
                exact.append((name, tuple(sorted(parts.items()))))
                continue
            for part, (src, _) in parts.items():
                start, length = self._slots[(name, part)]
                runs.append((start, src, length))
        runs.sort(key=lambda r: r[1])
        merged: list[tuple[int, int, int]] = []
        for start, src, length in runs:
            if merged and merged[-1][0] + merged[-1][2] == start and sum(merged[-1][1:]) == src:
                merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + length)
            else:
                merged.append((start, src, length))
        return _Plan(offset, tuple(merged), tuple(exact), tuple(found), tuple(spans))

    def _check_client(self, update: ClientUpdate) -> None:
        if update.client in self._clients:
            raise UpdateError(f"client {update.client!r} already contributed to this round")
        if update.num_samples <= 0:
            raise UpdateError(f"client {update.client!r}: num_samples must be > 0")

    def _fold(
        self, runs: list[tuple[int, np.ndarray]], products: dict[str, Module], n: int
    ) -> None:
        """Add ``n`` times each stretch into the accumulator: one fused pass per update.

        Blocks are weighted one cache-sized piece at a time (the scratch block stays
        in cache, so memory traffic is one read of the update and one
        read-modify-write of the accumulator), spread over the fold threads; numpy
        releases the GIL inside each operation.
        """
        weight = self._flat.dtype.type(n)
        blocks = [
            (start + lo, src[lo : lo + _BLOCK])
            for start, src in runs
            for lo in range(0, src.size, _BLOCK)
        ]
        shares = [blocks[i :: len(self._scratches)] for i in range(len(self._scratches))]
        shares = [share for share in shares if share]

        def fold(share: list[tuple[int, np.ndarray]], scratch: np.ndarray) -> None:
            for start, block in share:
                tmp = scratch[: block.size]
                np.multiply(block, weight, out=tmp)
                acc = self._flat[start : start + block.size]
                np.add(acc, tmp, out=acc)

        pending = [
            _fold_pool().submit(fold, share, scratch)
            for share, scratch in zip(shares[1:], self._scratches[1:], strict=False)
        ]
        if shares:
            fold(shares[0], self._scratches[0])
        for future in pending:
            future.result()
        for name, parts in products.items():
            if name not in self._products:
                self._products[name] = ProductSum(self._global[name])
            self._products[name].add(parts, n)

    def _record(self, client: str, n: int, modules: Iterable[str]) -> None:
        for name in modules:
            self._samples.setdefault(name, {})[client] = n
        self._clients.add(client)
        self._total_samples += n

    def _runs(
        self, update: ClientUpdate, keys: list[tuple[str, str]]
    ) -> list[tuple[int, np.ndarray]]:
        """(accumulator start, flat source) stretches of the update.

        Tensors adjacent both in the accumulator and in memory (as decoded
        from one payload) merge into one view, so an update costs a few large
        operations instead of several per tensor.
        """
        runs: list[tuple[int, np.ndarray]] = []
        # The open stretch: accumulator start and end, root buffer, byte span, dtype.
        span: tuple[int, int, np.ndarray, int, int, np.dtype] | None = None

        def close() -> None:
            if span is not None:
                start, _, root, begin, end, dtype = span
                raw = root.reshape(-1).view(np.uint8)
                origin = _address(root)
                runs.append((start, raw[begin - origin : end - origin].view(dtype)))

        for name, part in keys:
            x = update.modules[name][part]
            start, length = self._slots[(name, part)]
            if x.flags.c_contiguous:
                root, address = _root(x), _address(x)
                if (
                    span is not None
                    and span[1] == start
                    and span[2] is root
                    and span[4] == address
                    and span[5] == x.dtype
                ):
                    span = (span[0], start + length, root, span[3], address + x.nbytes, x.dtype)
                    continue
                if root.flags.c_contiguous:
                    close()
                    span = (start, start + length, root, address, address + x.nbytes, x.dtype)
                    continue
            close()
            span = None
            runs.append((start, x.reshape(-1)))
        close()
        return runs

    def result(self) -> AggregationResult:
        """The new global modules and statistics (the inputs are not modified)."""
        stats = dict(self._stats)
        rounds_stale: dict[str, int] = {}
        for name, contributors in self._samples.items():
            old = stats.get(name, ModuleStats())
            rounds_stale[name] = max(0, self._round - (old.last_round or 0) - 1)
            stats[name] = replace(
                old, update_count=old.update_count + len(contributors), last_round=self._round
            )
        names = set(self._global) | set(stats)
        mean_count = sum(stats.get(n, ModuleStats()).update_count for n in names) / max(
            1, len(names)
        )

        modules = {name: dict(parts) for name, parts in self._global.items()}
        weights: dict[str, dict[str, float]] = {}
        steps: dict[str, float] = {}
        changes: dict[str, float] = {}
        scored: list[tuple[str, Module, Module]] = []
        restarted: list[str] = []
        for name, contributors in self._samples.items():
            current = self._global[name]
            if self._rule is Rule.FEDAVG:
                denom = float(self._total_samples)
                stale = (denom - sum(contributors.values())) / denom
                step = 1.0
            else:
                denom = float(sum(contributors.values()))
                stale = 0.0
                share = denom / max(1.0, float(self._total_samples))
                step = self._dwa.step(
                    stats[name].update_count, mean_count, share, rounds_stale[name]
                )
            weights[name] = {c: n / denom for c, n in contributors.items()}
            if stale > 0:
                weights[name]["<stale>"] = stale
            steps[name] = step
            if name in self._products:
                modules[name], changes[name] = self._merge_product(
                    current, self._products[name], denom, stale, step
                )
                continue
            new = self._merge_factors(name, current, denom, stale, step)
            if not self._add_momentum(name, current, new):
                restarted.append(name)
            modules[name] = new
            if is_lora(current):
                scored.append((name, current, new))
            else:
                delta = sum(float(np.sum((new[p] - current[p]) ** 2)) for p in current)
                norm = sum(float(np.sum(new[p] ** 2)) for p in current)
                changes[name] = relative_change(delta, norm)
        for (name, _, _), (delta, norm) in zip(
            scored, product_changes([(before, after) for _, before, after in scored]), strict=True
        ):
            changes[name] = relative_change(delta, norm)
        stats = update_global_scores(stats, changes, self._round, decay=self._decay)
        return AggregationResult(modules, stats, weights, steps, changes, tuple(restarted))

    def _merge_factors(
        self, name: str, current: Module, denom: float, stale: float, step: float
    ) -> dict[str, np.ndarray]:
        """``W + step * (Agg - W)`` with ``Agg = sums / denom + stale * W``, as
        ``(1 - step + step * stale) W + (step / denom) sums``: two passes per tensor."""
        keep, scale = 1.0 - step + step * stale, step / denom
        new = {}
        for part, x in current.items():
            start, length = self._slots[(name, part)]
            sums = self._flat[start : start + length].reshape(x.shape)
            out = sums * sums.dtype.type(scale)
            if keep != 0.0:
                out += x * keep
            new[part] = out.astype(x.dtype, copy=False)
        return new

    def _add_momentum(self, name: str, current: Module, new: dict[str, np.ndarray]) -> bool:
        """``new += beta (W - W_prev)`` where the previous version has the module,
        unless ``restart`` and this round's step ``new - W`` points against it
        (then False: the module restarted)."""
        before = self._previous.get(name) if self._previous is not None else None
        if before is None or before.keys() != current.keys():
            return True
        for part, x in current.items():
            if before[part].shape != x.shape:
                raise ValueError(
                    f"module {name!r}, {part}: previous version has shape "
                    f"{before[part].shape}, current {x.shape}"
                )
        velocity = {
            part: (x - before[part]).astype(new[part].dtype, copy=False)
            for part, x in current.items()
        }
        if self._restart:
            agreement = sum(
                float(np.vdot(new[part] - x, velocity[part])) for part, x in current.items()
            )
            if agreement < 0.0:
                return False
        beta = self._momentum
        for part, v in velocity.items():
            new[part] += v * new[part].dtype.type(beta)
        return True

    def _merge_product(
        self, current: Module, sums: ProductSum, denom: float, stale: float, step: float
    ) -> tuple[dict[str, np.ndarray], float]:
        """The exact merge: the same step on the products, re-factorised to the rank."""
        keep, scale = 1.0 - step + step * stale, step / denom
        a, b, delta, norm = sums.merge(keep, scale)
        new = {LORA_A: a.astype(current[LORA_A].dtype), LORA_B: b.astype(current[LORA_B].dtype)}
        new.update({k: v for k, v in current.items() if k not in new})
        return new, relative_change(delta, norm)


class ProductSum:
    """``keep * B0 A0 + scale * sum_i n_i B_i A_i`` of one LoRA module, kept factored.

    The weighted mean of rank-``r_i`` products has rank at most ``r + sum r_i``,
    so the clients' factors are stacked side by side (``K = [B0 | n_1 B_1 | ...]``,
    ``L = [A0; A_1; ...]``) instead of adding ``out x in`` products. The merge
    takes a thin QR of each stack and an SVD of the small core ``R_K D R_L^T``:
    the same truncated SVD as of the dense matrix, in ``O((out + in) R^2)``
    time and ``O((out + in) R)`` memory. Once the stacks would hold more
    numbers than the dense matrix (many clients on a small layer), they are
    multiplied out once and later products are added densely.
    """

    def __init__(self, current: Module, *, stacked: bool = True) -> None:
        """``stacked=False`` adds dense products from the start (the older way, kept to
        compare against)."""
        self.rank = current[LORA_A].shape[0]
        self.dtype = np.result_type(current[LORA_A].dtype, current[LORA_B].dtype, np.float32)
        a0 = np.asarray(current[LORA_A], dtype=self.dtype)
        b0 = np.asarray(current[LORA_B], dtype=self.dtype)
        self._shape = (b0.shape[0], a0.shape[1])
        self._b: list[np.ndarray] = [b0]
        self._a: list[np.ndarray] = [a0]
        self._width = self.rank
        self._dense: np.ndarray | None = None if stacked else np.zeros(self._shape, self.dtype)

    @property
    def dense(self) -> bool:
        """Whether the sum is held as an ``out x in`` matrix (stacks would be larger)."""
        return self._dense is not None

    def add(self, parts: Module, n: int) -> None:
        b = np.asarray(parts[LORA_B], dtype=self.dtype) * self.dtype.type(n)
        a = np.array(parts[LORA_A], dtype=self.dtype)  # a copy: the update's buffer may go
        if self._dense is not None:
            self._dense += b @ a
            return
        self._b.append(b)
        self._a.append(a)
        self._width += a.shape[0]
        out, inn = self._shape
        if self._width * (out + inn) >= out * inn:
            self._dense = np.hstack(self._b[1:]) @ np.vstack(self._a[1:])
            self._b, self._a = self._b[:1], self._a[:1]

    def merge(self, keep: float, scale: float) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Factors ``(A, B)`` of the rank-``r`` truncation of ``W' = keep W0 + scale S``,
        with ``||W' - W0||_F^2`` and ``||W'||_F^2``. ``A`` has orthonormal rows."""
        b0, a0 = self._b[0], self._a[0]
        if self._dense is not None:
            w = b0 @ a0
            new_w = keep * w + scale * self._dense
            a, b = refactorise(new_w, self.rank)
            return a, b, float(np.sum((new_w - w) ** 2)), float(np.sum(new_w**2))
        q_k, r_k = np.linalg.qr(np.hstack(self._b))
        q_l, r_l = np.linalg.qr(np.vstack(self._a).T)
        d = np.full(self._width, scale, dtype=np.float64)
        d[: self.rank] = keep
        core = (r_k * d) @ r_l.T
        change = (r_k * (d - (np.arange(self._width) < self.rank))) @ r_l.T
        u, s, vt = np.linalg.svd(core)
        r = min(self.rank, s.shape[0])
        b = np.zeros((self._shape[0], self.rank), dtype=self.dtype)
        a = np.zeros((self.rank, self._shape[1]), dtype=self.dtype)
        b[:, :r] = q_k @ (u[:, :r] * s[:r])
        a[:r] = (q_l @ vt[:r].T).T
        return (
            a,
            b,
            float(np.sum(change.astype(np.float64) ** 2)),
            float(np.sum(s.astype(np.float64) ** 2)),
        )


def aggregate(
    global_modules: Mapping[str, Module],
    updates: Iterable[ClientUpdate],
    stats: Mapping[str, ModuleStats],
    round_number: int,
    *,
    rule: Rule | str = Rule.STAGG,
    merge: Merge | str = Merge.FACTORS,
    dwa: DwaConfig | None = None,
    ema_decay: float = DEFAULT_EMA_DECAY,
    momentum: float = 0.0,
    previous: Mapping[str, Module] | None = None,
    restart: bool = False,
) -> AggregationResult:
    """Aggregate ``updates`` in one call (see :class:`Aggregator`)."""
    agg = Aggregator(
        global_modules,
        stats,
        round_number,
        rule=rule,
        merge=merge,
        dwa=dwa,
        ema_decay=ema_decay,
        momentum=momentum,
        previous=previous,
        restart=restart,
    )
    for update in updates:
        agg.add(update)
    return agg.result()
