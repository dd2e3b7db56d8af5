"""Prometheus metrics of the coordinator (scraped at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REJECTIONS = Counter(
    "fedpilot_rejections_total", "Requests and uploads refused, by reason.", ["reason"]
)
UPLOADS = Counter("fedpilot_uploads_total", "Updates accepted (duplicates excluded).")
BYTES_IN = Counter("fedpilot_update_bytes_total", "Payload bytes of accepted updates.")
BYTES_OUT = Counter("fedpilot_adapter_download_bytes_total", "Adapter bytes sent to workers.")
ROUNDS = Counter("fedpilot_rounds_total", "Rounds closed, by outcome.", ["outcome"])
ROUND_SECONDS = Histogram(
    "fedpilot_round_seconds",
    "Wall time of a round from opening to commit.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
AGGREGATE_SECONDS = Histogram("fedpilot_aggregate_seconds", "Time to aggregate one round.")
ALIVE_WORKERS = Gauge("fedpilot_alive_workers", "Workers with a recent heartbeat.")
STRAGGLERS = Counter("fedpilot_stragglers_total", "Assigned workers that missed a deadline.")
