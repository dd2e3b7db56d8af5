"""The Fed-piLot algorithms as pure functions over plain data and numpy arrays.

Nothing here performs I/O or imports gRPC, SQLAlchemy, FastAPI or torch: the
coordinator and the worker both call into this package, never the reverse.
"""

from fedpilot.core.aggregation import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    DwaConfig,
    Merge,
    Rule,
    UpdateError,
    aggregate,
)
from fedpilot.core.ig_score import (
    ModuleStats,
    combine,
    global_scores,
    normalise,
    update_global_scores,
)
from fedpilot.core.knapsack import Solution, brute_force, solve, solve_batch
from fedpilot.core.memory import HEAD_LAYER, MemoryModel, ModuleCost, WorkerProfile
from fedpilot.core.partition import dirichlet_partition, iid_partition
from fedpilot.core.strategies import Assignment, Client, Strategy, assign

__all__ = [
    "HEAD_LAYER",
    "AggregationResult",
    "Aggregator",
    "Assignment",
    "Client",
    "ClientUpdate",
    "DwaConfig",
    "MemoryModel",
    "Merge",
    "ModuleCost",
    "ModuleStats",
    "Rule",
    "Solution",
    "Strategy",
    "UpdateError",
    "WorkerProfile",
    "aggregate",
    "assign",
    "brute_force",
    "combine",
    "dirichlet_partition",
    "global_scores",
    "iid_partition",
    "normalise",
    "solve",
    "solve_batch",
    "update_global_scores",
]
