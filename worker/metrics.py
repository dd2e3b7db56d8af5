"""Prometheus metrics of a worker (``fedpilot worker --metrics-port``; documented in
docs/operations.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TASKS = Counter(
    "fedpilot_worker_tasks_total",
    "Tasks this worker ended, by kind and outcome.",
    ["kind", "outcome"],
)
TRAIN_STEPS = Counter("fedpilot_worker_train_steps_total", "Optimizer steps taken.")
TRAIN_SAMPLES = Counter("fedpilot_worker_train_samples_total", "Training examples processed.")
SAMPLES_PER_SECOND = Gauge(
    "fedpilot_worker_train_samples_per_second", "Training throughput of the last task."
)
TRAIN_SECONDS = Counter("fedpilot_worker_train_seconds_total", "Time spent training.")
BUDGET = Gauge("fedpilot_worker_memory_budget_bytes", "The memory budget the knapsack respects.")
MEMORY_BASELINE = Gauge(
    "fedpilot_worker_memory_baseline_bytes",
    "CPU: the idle worker with the job loaded, less the weights (needs baseline + budget).",
)
MEMORY_LIMIT = Gauge(
    "fedpilot_worker_memory_limit_bytes", "Hard limit in force (cgroup or CUDA cap); 0 = none."
)
PREDICTED_PEAK = Gauge(
    "fedpilot_worker_predicted_peak_bytes", "Peak memory predicted for the last assignment."
)
MEASURED_PEAK = Gauge(
    "fedpilot_worker_measured_peak_bytes", "Peak training memory measured in the last task."
)
LOSS = Gauge("fedpilot_worker_train_loss", "Mean training loss of the last task.")
UPLOAD_BYTES = Counter("fedpilot_worker_upload_bytes_total", "Update payload bytes uploaded.")
DOWNLOAD_BYTES = Counter(
    "fedpilot_worker_download_bytes_total", "Adapter payload bytes downloaded."
)
CONNECTED = Gauge("fedpilot_worker_connected", "1 while the coordinator answers, else 0.")
