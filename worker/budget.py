"""What a worker's memory budget means, and how the worker holds itself to it.

A budget ``B`` is the memory a worker promises its tasks never exceed. Every
part of a task counts: the IG probe, every training step, the loss
evaluations, the adapter it decodes and the update it encodes; the profile task
too (it measures on one and two rows of the batch, see ``profiling``).

- **CUDA**: bytes the process's PyTorch allocator holds on its device (tensors
  and the allocator's cache). The worker caps the allocator at ``B`` with
  ``torch.cuda.set_per_process_memory_fraction``; an allocation beyond it
  raises ``torch.cuda.OutOfMemoryError`` inside the task, which the worker
  catches and reports as the task's failure (``ERROR_REASON_OUT_OF_MEMORY``,
  with the numbers). The CUDA context and kernels live outside the allocator;
  the safety margin of ``resolve_budget`` leaves room for them.
- **CPU**: the model's weights plus everything a task adds to the process's
  memory (resident pages, as a memory cgroup charges them) *above the idle
  worker*: the idle baseline is the process at rest between tasks with the
  job's model, tokenizer and data loaded, less the weights, plus a fixed
  ``HOST_RESERVE_BYTES`` for the interpreter's heap during a task. So ``B`` counts
  exactly what the memory model ``cost(S)`` predicts (weights, activations,
  gradients, optimizer state) plus the transient buffers of the task, and the
  baseline holds what does not depend on the assignment: interpreter,
  libraries (~280 MiB with torch 2.13 CPU), tokenizer, examples and Python
  objects of the model. The worker measures it after loading a job and logs it
  (and exports ``fedpilot_worker_memory_baseline_bytes``): a machine needs
  ``baseline + B`` per worker. Why not the process total: the runtime is the
  same for every assignment and several times the budget of a small model, so
  a total would measure the installation, not the assignment the coordinator
  chooses; and it cannot be predicted on the coordinator.

Run as root (or with a delegated cgroup) on CPU, the worker moves itself into a
memory cgroup it creates and, once a job is loaded, limits it to
``baseline + B``: an overrun is stopped by the kernel (the worker is OOM-killed
and restarted by its supervisor; its task becomes a straggler), never absorbed
by the machine. In a container the container's limit plays that role.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
WORKER_CGROUP_PREFIX = "fedpilot-worker-"
_UNLIMITED = 2**62
HOST_RESERVE_BYTES = 16 * 2**20
"""Part of the CPU baseline: the interpreter's working heap during a task (Python objects,
small tensors, profiler buffers, gRPC messages). It comes and goes with every task but
does not depend on the assignment, and no tensor model predicts it: a MiniLM task's peak
above the idle worker exceeds its training step's tensor peak by 9-15 MiB
(docs/benchmarks.md)."""


class CgroupError(RuntimeError):
    """The memory cgroup is missing or not writable (not root, no delegation)."""


@dataclass(frozen=True)
class MemoryCgroup:
    """One memory cgroup (v1 ``memory`` controller or v2 unified), read and written as files."""

    path: Path
    version: int

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.version == 1 else v2)

    def _read_int(self, v1: str, v2: str) -> int:
        text = self._file(v1, v2).read_text().strip()
        return _UNLIMITED if text == "max" else int(text)

    def _write(self, v1: str, v2: str, value: str) -> None:
        try:
            self._file(v1, v2).write_text(value)
        except OSError as e:
            raise CgroupError(f"cannot write {self._file(v1, v2)}: {e}") from e

    @property
    def usage(self) -> int:
        """Bytes charged now (anonymous memory, page cache, kernel memory)."""
        return self._read_int("memory.usage_in_bytes", "memory.current")

    @property
    def max_usage(self) -> int:
        """Highest charge since creation or :meth:`reset_max_usage`."""
        return self._read_int("memory.max_usage_in_bytes", "memory.peak")

    def reset_max_usage(self) -> None:
        self._write("memory.max_usage_in_bytes", "memory.peak", "0")

    @property
    def limit(self) -> int:
        return self._read_int("memory.limit_in_bytes", "memory.max")

    def set_limit(self, limit_bytes: int) -> None:
        """Hard limit; beyond it the kernel reclaims, then OOM-kills a process of the group."""
        if self.version == 1:
            # Without swap accounting the memsw limit must stay >= the limit; raise it first.
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                with contextlib.suppress(OSError):
                    memsw.write_text("-1")
        self._write("memory.limit_in_bytes", "memory.max", str(int(limit_bytes)))
        if self.version == 2 and (self.path / "memory.swap.max").exists():
            self._write("", "memory.swap.max", "0")

    @property
    def failcnt(self) -> int:
        """Times the limit was hit (v1; v2 counts ``max`` events)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        return _keyed(self.path / "memory.events").get("max", 0)

    @property
    def oom_kills(self) -> int:
        """Processes of this group killed by the OOM killer."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        return _keyed(self.path / name).get("oom_kill", 0)

    def pids(self) -> list[int]:
        text = (self.path / "cgroup.procs").read_text()
        return [int(p) for p in text.split()]

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this group."""
        if self.version == 1:
            # Charges made before the move follow the process (v2 does not move charges).
            move = self.path / "memory.move_charge_at_immigrate"
            if move.exists():
                with contextlib.suppress(OSError):
                    move.write_text("3")
        self._write("cgroup.procs", "cgroup.procs", str(pid))

    def remove(self) -> None:
        """Delete the (empty) group."""
        self.path.rmdir()


def _keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def own_memory_cgroup(pid: int | str = "self") -> MemoryCgroup:
    """The memory cgroup ``pid`` is in, from ``/proc/<pid>/cgroup``."""
    v2_path = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = CGROUP_ROOT / "memory" / path.lstrip("/")
            if (group / "memory.limit_in_bytes").exists():
                return MemoryCgroup(group, 1)
        if controllers == "":
            v2_path = CGROUP_ROOT / path.lstrip("/")
    controllers_file = CGROUP_ROOT / "cgroup.controllers"
    if (
        v2_path is not None
        and controllers_file.exists()
        and "memory" in controllers_file.read_text().split()
    ):
        return MemoryCgroup(v2_path, 2)
    raise CgroupError("no memory cgroup controller is mounted under /sys/fs/cgroup")


def create_child_cgroup(prefix: str, parent: MemoryCgroup | None = None) -> MemoryCgroup:
    """A new, empty memory cgroup below ``parent`` (default: the caller's own)."""
    parent = parent or own_memory_cgroup()
    path = parent.path / f"{prefix}{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
    except OSError as e:
        raise CgroupError(
            f"cannot create a memory cgroup under {parent.path}: {e} "
            "(needs root or a delegated cgroup)"
        ) from e
    group = MemoryCgroup(path, parent.version)
    if group.version == 1 and (path / "memory.use_hierarchy").exists():
        with contextlib.suppress(OSError):  # inherited, and read-only once set
            (path / "memory.use_hierarchy").write_text("1")
    return group


def remove_stale_cgroups(parent: MemoryCgroup, prefix: str) -> int:
    """Remove empty groups a killed predecessor left behind; returns how many."""
    removed = 0
    for child in parent.path.glob(f"{prefix}*"):
        try:
            if not (child / "cgroup.procs").read_text().strip():
                child.rmdir()
                removed += 1
        except OSError:
            continue
    return removed


# --- the process's own memory --------------------------------------------------------


def resident_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (``/proc/<pid>/statm``)."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def tune_malloc(arenas: int = 2, mmap_threshold: int = 64 * 2**10) -> None:
    """Make freed memory leave the process, so what it holds tracks what it uses.

    glibc otherwise raises its mmap threshold after the first large free (up to
    32 MiB), then serves tensors from heaps that keep freed pages resident, and
    gives each thread (gRPC, heartbeat, torch) an arena of its own. A fixed
    threshold maps every tensor above 64 KiB on its own and unmaps it on free;
    ``arenas`` caps the per-thread arenas (``MALLOC_ARENA_MAX``).
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (also turns off its growth)
        libc.mallopt(-1, 2 * mmap_threshold)  # M_TRIM_THRESHOLD


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so what a task freed
    stops counting against the next one (glibc keeps it otherwise)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# --- enforcement -----------------------------------------------------------------------


def import_runtime() -> None:
    """Import what tasks need, so the runtime is in memory before any job."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from torch.utils.checkpoint import checkpoint

    import fedpilot.worker.data
    import fedpilot.worker.profiling
    import fedpilot.worker.scoring
    import fedpilot.worker.training  # noqa: F401

    # Code that loads itself on first use (the optimizer's and checkpointing's lazy
    # imports, the autograd engine's thread) is runtime, not a task: run it once.
    x = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.AdamW([x], lr=1e-3)
    checkpoint(torch.sin, x, use_reentrant=False).sum().backward()
    optimizer.step()


@dataclass
class MemoryGuard:
    """The budget as enforced on this worker: how, and the numbers, for log and metrics."""

    device: str
    budget_bytes: int
    kind: str = "none"
    """``cuda-fraction``, ``cgroup`` or ``none``."""
    detail: str = ""
    baseline_bytes: int = 0
    """CPU: the idle worker with the job loaded, less the weights (0 before a job)."""
    limit_bytes: int = 0
    cgroup: MemoryCgroup | None = None

    @classmethod
    def start(cls, device: str, budget_bytes: int, *, cgroup: bool = True) -> MemoryGuard:
        """Tune the allocator, import the runtime, and put the cap in place where the
        platform allows. Never raises for a missing capability: ``kind`` and ``detail``
        say what is in force."""
        tune_malloc()
        import_runtime()
        guard = cls(device, budget_bytes)
        if device.startswith("cuda"):
            guard._cap_cuda()
        elif not cgroup:
            guard.detail = "memory cgroup turned off"
        else:
            try:
                guard._confine()
            except (CgroupError, OSError) as e:
                guard.detail = str(e)
        return guard

    def _cap_cuda(self) -> None:
        import torch

        dev = torch.device(self.device)
        total = int(torch.cuda.get_device_properties(dev).total_memory)
        fraction = min(1.0, self.budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, dev)
        self.kind, self.limit_bytes = "cuda-fraction", int(fraction * total)
        self.detail = f"allocator capped at {fraction:.4f} of {total} bytes on {self.device}"

    def _confine(self) -> None:
        parent = own_memory_cgroup()
        remove_stale_cgroups(parent, WORKER_CGROUP_PREFIX)
        group = create_child_cgroup(WORKER_CGROUP_PREFIX, parent)
        try:
            if not group._file("memory.limit_in_bytes", "memory.max").exists():
                # v2 without the memory controller delegated to the new group
                raise CgroupError(f"{group.path} has no memory controller")
            group.add(os.getpid())
        except (CgroupError, OSError):
            group.remove()
            raise
        self.kind, self.cgroup = "cgroup", group
        self.detail = f"memory cgroup {group.path}; limited once a job is loaded"

    def job_loaded(self, weight_bytes: int, *, reloaded: bool = True) -> None:
        """Before a task's work, with the job's model, tokenizer and data loaded and the
        worker idle: start the task's meter and, when the job's state was (re)loaded,
        measure the baseline and (CPU, in a cgroup) limit the worker to baseline + budget.

        The baseline is not re-measured between tasks of an unchanged job, so memory a
        task leaves behind counts against the next one instead of moving the baseline."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
            return
        release_memory()
        if not reloaded and self.baseline_bytes:
            if self.cgroup is not None:
                self.cgroup.reset_max_usage()
            return
        used = self.cgroup.usage if self.cgroup is not None else resident_bytes()
        baseline = max(0, used - weight_bytes) + HOST_RESERVE_BYTES
        if self.cgroup is not None:
            self.cgroup.reset_max_usage()
        if baseline == self.baseline_bytes:
            return
        self.baseline_bytes = baseline
        if self.cgroup is not None:
            try:
                self.cgroup.set_limit(baseline + self.budget_bytes)
                self.limit_bytes = baseline + self.budget_bytes
            except CgroupError as e:
                log.warning("memory limit not set, running without: %s", e)
                self.kind, self.detail, self.limit_bytes = "none", str(e), 0
        log.info(
            "memory: idle baseline %d bytes with the job loaded (weights %d counted in the "
            "budget); limit %s",
            baseline,
            weight_bytes,
            self.limit_bytes or "none",
        )

    def task_done(self) -> None:
        """Hand what the task freed back to the OS."""
        if not self.device.startswith("cuda"):
            release_memory()

    def peak_bytes(self) -> int:
        """The highest charge the enforcing meter saw (cgroup or CUDA allocator); 0 if none."""
        if self.cgroup is not None:
            return max(0, self.cgroup.max_usage - self.baseline_bytes)
        return device_peak_bytes(self.device)

    def close(self) -> None:
        """Leave and delete the worker's own cgroup at shutdown."""
        group = self.cgroup
        if group is None:
            return
        try:
            MemoryCgroup(group.path.parent, group.version).add(os.getpid())
            group.remove()
        except (CgroupError, OSError) as e:
            log.debug("could not remove %s: %s", group.path, e)


def warm_up(model: Any, batches: Sequence[Any]) -> None:
    """Run the code paths of a task once on one example (evaluation, IG probe), so the
    memory they keep for good is in the idle baseline and not charged to the first task."""
    from fedpilot.worker.scoring import local_ig_scores
    from fedpilot.worker.training import evaluate

    if batches:
        evaluate(model, batches[:1])
        local_ig_scores(model, batches[:1], max_examples=1)
    release_memory()


# --- out-of-memory inside a task -------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, MemoryError, or the CPU allocator's."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker extra always has torch
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text
    )


def device_peak_bytes(device: str) -> int:
    """Peak allocator bytes on a CUDA device since the last reset; 0 on CPU."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated(torch.device(device)))
