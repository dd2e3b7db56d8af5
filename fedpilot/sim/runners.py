"""Where the simulator's client turns run: in this process, or on Ray actors.

A *turn* is what a worker does after a download: load the adapter, probe local
IG-Scores, train the assigned modules, read them back
(:func:`fedpilot.sim.engine.client_turn`). Turns of one round are independent,
so they can run anywhere; the round itself (sampling, assignment, aggregation in
the fixed order, evaluation) always stays in the simulator. Each turn sets its
own training seed and loads the whole global adapter first, so where it runs
does not change its result.

Spreading turns is Ray's job, not a process pool of ours: one actor per core or
device, each holding its own model (``ModelCache``), the adapter shipped once
per round through Ray's object store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fedpilot.sim.engine import Simulation, TurnResult, VirtualClient

Adapter = dict[str, dict[str, np.ndarray]]


log = logging.getLogger(__name__)

STARTUP_ATTEMPTS = 3
"""Tries of ``ray.init`` on a local node that misses Ray's startup window."""


@dataclass(frozen=True)
class Turn:
    """One client's work in a round: start from ``adapter``, train ``modules``."""

    client: VirtualClient
    adapter: Adapter
    modules: tuple[str, ...]
    probe: bool = True


class TurnRunner(Protocol):
    def run(self, sim: Simulation, turns: Sequence[Turn], number: int) -> list[TurnResult]:
        """Results of ``turns`` of round ``number``, in the order of ``turns``."""
        ...

    def close(self) -> None:
        """Release what the runner started (processes, a Ray instance)."""
        ...


class InProcess:
    """Turns one after another on the simulator's own model (the default)."""

    def run(self, sim: Simulation, turns: Sequence[Turn], number: int) -> list[TurnResult]:
        from fedpilot.sim.engine import client_turn

        return [
            client_turn(
                sim.cache, sim.spec, sim.options, t.client, t.adapter, t.modules, number, t.probe
            )
            for t in turns
        ]

    def close(self) -> None:
        pass


def runner_for(ray_actors: int) -> TurnRunner:
    """``ray_actors`` Ray actors, or this process when 0 (the CLIs' ``--ray-actors``)."""
    return RayActors(ray_actors) if ray_actors else InProcess()


class _TurnActor:
    """A Ray actor: one model and its tokenised client data, kept across turns."""

    def __init__(self, threads: int) -> None:
        from fedpilot.sim.engine import ModelCache

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.cache = ModelCache()

    def turn(
        self, spec: Any, options: Any, turn: Turn, adapter: Adapter, number: int
    ) -> tuple[int, TurnResult]:
        """``turn`` with its adapter passed apart, so Ray resolves it from the object store."""
        from fedpilot.sim.engine import client_turn

        result = client_turn(
            self.cache, spec, options, turn.client, adapter, turn.modules, number, turn.probe
        )
        return os.getpid(), result


class RayActors:
    """Turns spread over ``actors`` Ray actors, each with ``threads`` torch threads.

    Starts a local Ray instance on first use unless one is running or ``address``
    names a cluster (client data paths must then be readable on every node).
    """

    def __init__(self, actors: int, threads: int = 1, address: str | None = None) -> None:
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self.actors, self.threads, self.address = actors, threads, address
        self._pool: Any = None
        self._started_ray = False
        self.actor_pids: set[int] = set()
        """Processes that ran at least one turn (to show where the work went)."""

    def _ensure_pool(self) -> Any:
        if self._pool is None:
            import ray
            from ray.util import ActorPool

            if not ray.is_initialized():
                self._started_ray = True
                self._start_ray(ray)
            remote = ray.remote(num_cpus=max(1, self.threads))(_TurnActor)
            self._pool = ActorPool([remote.remote(self.threads) for _ in range(self.actors)])
        return self._pool

    def _start_ray(self, ray: Any, attempts: int = STARTUP_ATTEMPTS) -> None:
        """``ray.init``, tried again when the local node misses Ray's fixed 30 s startup
        window (its raylet and GCS start as processes, slow on a busy machine)."""
        for attempt in range(1, attempts + 1):
            try:
                ray.init(
                    address=self.address,
                    num_cpus=None if self.address else self.actors * max(1, self.threads),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
                return
            except Exception as e:
                if attempt == attempts or "timed out during startup" not in str(e):
                    raise
                log.warning("Ray did not start in time (attempt %d of %d)", attempt, attempts)
                ray.shutdown()

    def run(self, sim: Simulation, turns: Sequence[Turn], number: int) -> list[TurnResult]:
        import ray

        pool = self._ensure_pool()
        # Each distinct adapter goes into the object store once, not once per turn.
        refs: dict[int, Any] = {}
        for t in turns:
            if id(t.adapter) not in refs:
                refs[id(t.adapter)] = ray.put(t.adapter)
        stripped = [(replace(t, adapter={}), refs[id(t.adapter)]) for t in turns]
        results = []
        for pid, result in pool.map(
            lambda actor, job: actor.turn.remote(sim.spec, sim.options, job[0], job[1], number),
            stripped,
        ):
            self.actor_pids.add(pid)
            results.append(result)
        return results

    def close(self) -> None:
        """Release the actors; stop Ray too if this runner started it."""
        import ray

        self._pool = None  # the actors go with their last handle
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False
