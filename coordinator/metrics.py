"""Prometheus metrics of the coordinator (scraped at ``/metrics`` on the HTTP port).

Names follow Prometheus conventions: ``fedpilot_`` prefix, ``_total`` for
counters, base units (``_seconds``, ``_bytes``). Each is listed in
docs/operations.md.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

from prometheus_client import Counter, Gauge, Histogram

REJECTIONS = Counter(
    "fedpilot_rejections_total", "Requests and uploads refused, by reason.", ["reason"]
)
REGISTRATIONS = Counter("fedpilot_registrations_total", "Workers registered.")
UPLOADS = Counter("fedpilot_uploads_total", "Updates accepted (duplicates excluded).")
DUPLICATE_UPLOADS = Counter(
    "fedpilot_duplicate_uploads_total", "Updates received again and counted once."
)
BYTES_IN = Counter("fedpilot_received_bytes_total", "Payload bytes of accepted updates.")
BYTES_OUT = Counter(
    "fedpilot_sent_bytes_total", "Adapter payload bytes sent to workers (downloads and tasks)."
)
ROUNDS = Counter("fedpilot_rounds_total", "Rounds ended, by outcome.", ["outcome"])
ROUND_SECONDS = Histogram(
    "fedpilot_round_duration_seconds",
    "Wall time of a round from opening to commit.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
ASSIGN_SECONDS = Histogram(
    "fedpilot_assignment_solve_seconds",
    "Time to compute one round's module assignment (strategy + knapsack).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
AGGREGATE_SECONDS = Histogram(
    "fedpilot_aggregation_seconds", "Time to aggregate one round's updates and commit."
)
ALIVE_WORKERS = Gauge("fedpilot_workers_connected", "Workers with a recent heartbeat.")
HEARTBEAT_INTERVAL = Gauge(
    "fedpilot_heartbeat_interval_seconds",
    "Heartbeat interval handed to workers (grows with the fleet, coordinator/cadence.py).",
)
STRAGGLERS = Counter("fedpilot_stragglers_total", "Assigned workers that missed a deadline.")
INTERNAL_ERRORS = Counter(
    "fedpilot_internal_errors_total",
    "gRPC calls that failed on an unexpected exception (the log has the error id).",
    ["method"],
)
RESENT_CALLS = Counter(
    "fedpilot_resent_calls_total",
    "Calls that arrived as a client's retry (gRPC's grpc-previous-rpc-attempts): mostly "
    "calls this coordinator's gRPC core shed unhandled when it fell behind taking calls in.",
    ["method"],
)
DRIVER_ERRORS = Counter(
    "fedpilot_driver_errors_total", "Round-driver loops that failed and were carried on."
)
DRIVER_LAST_LOOP = Gauge(
    "fedpilot_driver_last_loop_timestamp_seconds", "When the round driver last finished a loop."
)
WORKER_BUDGET = Gauge(
    "fedpilot_registered_budget_bytes", "Memory budget a worker registered with.", ["worker"]
)
WORKER_PEAK = Gauge(
    "fedpilot_reported_peak_bytes",
    "Peak training memory a worker measured in its last accepted update.",
    ["worker"],
)
WORKER_PREDICTED = Gauge(
    "fedpilot_predicted_peak_bytes",
    "Peak memory the memory model predicted for a worker's last assignment.",
    ["worker"],
)
GLOBAL_ACCURACY = Gauge(
    "fedpilot_global_accuracy", "Held-out accuracy of the newest global adapter.", ["job"]
)
GLOBAL_LOSS = Gauge("fedpilot_global_loss", "Held-out loss of the newest global adapter.", ["job"])


class WorkerSeries:
    """Per-worker gauges labelled by worker id (never by the name a worker chose), for at
    most ``limit`` workers: the least recently updated worker's series are dropped."""

    gauges = (WORKER_BUDGET, WORKER_PEAK, WORKER_PREDICTED)

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def set(self, gauge: Gauge, worker_id: str, value: float) -> None:
        with self._lock:
            self._recent[worker_id] = None
            self._recent.move_to_end(worker_id)
            while len(self._recent) > self.limit:
                old, _ = self._recent.popitem(last=False)
                for g in self.gauges:
                    with contextlib.suppress(KeyError):
                        g.remove(old)
            gauge.labels(worker=worker_id).set(value)


WORKERS = WorkerSeries()
"""The coordinator's per-worker series (``limit`` set from ``metrics_max_workers``)."""
