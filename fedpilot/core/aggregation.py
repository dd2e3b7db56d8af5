"""Server-side merging of uneven module updates (DESIGN.md section 3).

A *module* is a small dict of named tensors: a LoRA module has ``lora_A``
(``r x in``) and ``lora_B`` (``out x r``); the task head has its full weights.
Clients send only the modules they trained.

- **STAgg** (``rule="stagg"``): module ``m`` is averaged over the clients that
  trained it, weighted by sample counts; then the global module moves toward
  that average by a step ``eta_m`` that grows for under-updated modules (DWA):
  ``W <- W + eta_m (Agg - W)``, ``eta_m = eta * clip((u_mean / u_m) ** gamma, 1, eta_max)``.
  Two optional refinements keep the step inside the clients' hull and damp
  modules few participants trained: ``convex`` caps ``eta_m`` at 1, and
  ``coverage`` multiplies it by the share of this round's samples whose
  clients trained the module (with ``gamma=0`` that is FedAvg's stale blend).
- **FedAvg** (``rule="fedavg"``): the baseline; every participant counts for
  every module, and one that did not train ``m`` contributes the stale global value.

``merge="factors"`` averages ``A`` and ``B`` separately; ``merge="exact"``
averages the products ``B_i A_i`` and re-factorises with a truncated SVD.

:class:`Aggregator` consumes updates one at a time and keeps only one
accumulator per module, so memory does not grow with the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    convex: bool = False
    """Cap ``eta_m`` at 1, so the new value stays between the old one and the aggregate."""
    coverage: bool = False
    """Scale ``eta_m`` by the share of the round's samples that trained the module: a module
    averaged over a few skewed clients moves only as far as their share of the round."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eta <= 10.0:
            raise ValueError(f"eta must be in (0, 10], got {self.eta}")
        if not 0.0 <= self.gamma <= 10.0:
            raise ValueError(f"gamma must be in [0, 10], got {self.gamma}")
        if not 1.0 <= self.eta_max <= 100.0:
            raise ValueError(f"eta_max must be in [1, 100], got {self.eta_max}")

    def step(self, count: int, mean_count: float, share: float = 1.0) -> float:
        """``eta_m`` for a module with ``count`` updates when modules average ``mean_count``;
        ``share`` is the fraction of the round's samples from clients that trained it."""
        ratio = (mean_count / count) ** self.gamma if count > 0 else self.eta_max
        step = self.eta * min(max(ratio, 1.0), self.eta_max)
        if self.coverage:
            step *= min(max(share, 0.0), 1.0)
        return min(step, 1.0) if self.convex else step


@dataclass(frozen=True)
class ClientUpdate:
    """The modules one client trained this round and how many samples it trained on."""

    client: str
    num_samples: int
    modules: Mapping[str, Module]


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


def is_lora(module: Module) -> bool:
    return LORA_A in module and LORA_B in module


def product(module: Module) -> np.ndarray:
    """``B @ A`` in float32 (float64 if the factors are)."""
    dtype = np.result_type(module[LORA_B].dtype, module[LORA_A].dtype, np.float32)
    out: np.ndarray = np.asarray(module[LORA_B], dtype=dtype) @ np.asarray(
        module[LORA_A], dtype=dtype
    )
    return out


def product_change(before: Module, after: Module) -> tuple[float, float]:
    """``||B'A' - BA||_F^2`` and ``||B'A'||_F^2`` without forming either product.

    Uses ``<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T))``: rank x rank
    matrices only, so scoring a 4096 x 4096 module costs kilobytes, not 64 MiB.
    """
    a0, b0 = before[LORA_A].astype(np.float64), before[LORA_B].astype(np.float64)
    a1, b1 = after[LORA_A].astype(np.float64), after[LORA_B].astype(np.float64)

    def inner(b_x: np.ndarray, a_x: np.ndarray, b_y: np.ndarray, a_y: np.ndarray) -> float:
        return float(np.trace((b_x.T @ b_y) @ (a_y @ a_x.T)))

    old, new = inner(b0, a0, b0, a0), inner(b1, a1, b1, a1)
    cross = inner(b0, a0, b1, a1)
    return max(old + new - 2.0 * cross, 0.0), max(new, 0.0)


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
"""Elements weighted per step: 128 KiB of float32, comfortably inside L2."""


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
    ) -> None:
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
        self._flat = np.zeros(size, dtype=np.result_type(np.float32, *dtypes))
        self._products: dict[str, np.ndarray] = {}

    def _exact(self, module: Module) -> bool:
        return self._merge is Merge.EXACT and is_lora(module)

    def _check(self, update: ClientUpdate) -> None:
        """Structure of the update: names, tensor sets, shapes, dtypes (values come later)."""
        if update.client in self._clients:
            raise UpdateError(f"client {update.client!r} already contributed to this round")
        if update.num_samples <= 0:
            raise UpdateError(f"client {update.client!r}: num_samples must be > 0")
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
        self._check(update)
        n = update.num_samples
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
        if any(not np.isfinite(src.sum()) for _, src in runs):
            self._require_finite(update, keys)
        products = {}
        for name, parts in update.modules.items():
            if self._exact(parts):
                self._require_finite(update, [(name, p) for p in parts])
                products[name] = product(parts)
        # Validated: from here on nothing can fail half-way.
        weight = self._flat.dtype.type(n)
        scratch = np.empty(min(_BLOCK, self._flat.size), dtype=self._flat.dtype)
        for start, src in runs:
            # Weight a cache-sized block at a time: the scratch block stays in
            # cache, so memory traffic is one read of the update and one
            # read-modify-write of the accumulator.
            for lo in range(0, src.size, _BLOCK):
                block = src[lo : lo + _BLOCK]
                tmp = scratch[: block.size]
                np.multiply(block, weight, out=tmp)
                acc = self._flat[start + lo : start + lo + block.size]
                np.add(acc, tmp, out=acc)
        for name, p in products.items():
            acc = self._products.setdefault(name, np.zeros_like(p))
            p *= p.dtype.type(n)
            acc += p
        for name in update.modules:
            self._samples.setdefault(name, {})[update.client] = n
        self._clients.add(update.client)
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

    def _sums(self, name: str) -> dict[str, np.ndarray]:
        if name in self._products:
            return {"product": self._products[name]}
        out = {}
        for part, x in self._global[name].items():
            start, length = self._slots[(name, part)]
            out[part] = self._flat[start : start + length].reshape(x.shape)
        return out

    def result(self) -> AggregationResult:
        """The new global modules and statistics (the inputs are not modified)."""
        stats = dict(self._stats)
        for name, contributors in self._samples.items():
            old = stats.get(name, ModuleStats())
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
                step = self._dwa.step(stats[name].update_count, mean_count, share)
            weights[name] = {c: n / denom for c, n in contributors.items()}
            if stale > 0:
                weights[name]["<stale>"] = stale
            new, change = self._merge_module(current, self._sums(name), denom, stale, step)
            modules[name] = new
            steps[name] = step
            changes[name] = change
        stats = update_global_scores(stats, changes, self._round, decay=self._decay)
        return AggregationResult(modules, stats, weights, steps, changes)

    def _merge_module(
        self,
        current: Module,
        sums: Mapping[str, np.ndarray],
        denom: float,
        stale: float,
        step: float,
    ) -> tuple[dict[str, np.ndarray], float]:
        """``W + step * (Agg - W)`` where ``Agg = sums / denom + stale * W``."""
        if "product" in sums:
            w = product(current)
            agg = sums["product"] / denom + stale * w
            new_w = w + step * (agg - w)
            a, b = refactorise(new_w, current[LORA_A].shape[0])
            new = {LORA_A: a.astype(current[LORA_A].dtype), LORA_B: b.astype(current[LORA_B].dtype)}
            new.update({k: v for k, v in current.items() if k not in new})
            delta = float(np.sum((new_w - w) ** 2))
            return new, relative_change(delta, float(np.sum(new_w**2)))
        new = {}
        for part, x in current.items():
            ref = x.astype(sums[part].dtype, copy=False)
            agg = sums[part] / sums[part].dtype.type(denom) + stale * ref
            new[part] = (ref + step * (agg - ref)).astype(x.dtype, copy=False)
        if is_lora(current):
            delta, norm = product_change(current, new)
        else:
            delta = sum(float(np.sum((new[p] - current[p]) ** 2)) for p in current)
            norm = sum(float(np.sum(new[p] ** 2)) for p in current)
        return new, relative_change(delta, norm)


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
) -> AggregationResult:
    """Aggregate ``updates`` in one call (see :class:`Aggregator`)."""
    agg = Aggregator(
        global_modules, stats, round_number, rule=rule, merge=merge, dwa=dwa, ema_decay=ema_decay
    )
    for update in updates:
        agg.add(update)
    return agg.result()
