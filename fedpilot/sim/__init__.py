"""The simulation engine: virtual clients in one process on the services' own functions."""

from fedpilot.sim.engine import (
    ModelCache,
    RoundRecord,
    SimOptions,
    SimResult,
    Simulation,
    VirtualClient,
)

__all__ = [
    "ModelCache",
    "RoundRecord",
    "SimOptions",
    "SimResult",
    "Simulation",
    "VirtualClient",
]
