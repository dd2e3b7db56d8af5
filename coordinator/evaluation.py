"""Server-side evaluation of a global adapter on a held-out set.

Optional: it needs the worker extra (torch, transformers, peft). Like a
server-side ``evaluate_fn``, it measures the global model on data the
operator holds; federated evaluation on workers' data is the alternative.

The held-out data has the job's task format (labelled texts, instruction JSON
Lines, images) and goes through the same readers and batches as a worker's.
Classification reports ``eval_loss`` (cross-entropy per example) and
``eval_accuracy``; a causal LM reports ``eval_loss`` (cross-entropy per
response token), ``eval_perplexity`` (its exponential) and
``eval_token_accuracy`` (next-token predictions on response tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpilot.coordinator.jobspec import JobSpec

EVAL_BATCH_SIZE = 64


class HeldOutEvaluator:
    """Keeps the model and evaluation batches of each job between rounds."""

    def __init__(self, max_examples: int = 2000) -> None:
        self.max_examples = max_examples
        self._cache: dict[str, tuple[Any, list[Any]]] = {}

    def _prepare(self, spec: JobSpec) -> tuple[Any, list[Any]]:
        from fedpilot.coordinator.export import model_spec
        from fedpilot.worker.model import load_model
        from fedpilot.worker.tasks import get_task, read_local_data

        key = spec.model_dump_json(
            include={
                "model",
                "task",
                "num_labels",
                "lora",
                "max_seq_len",
                "eval_dataset",
                "labels",
                "dtype",
            }
        )
        if key not in self._cache:
            spec_of_model = model_spec(spec, batch_size=EVAL_BATCH_SIZE)
            task = get_task(spec.task)
            data = task.dataset(
                read_local_data(spec.eval_dataset),
                label_names=spec.labels or None,
                num_labels=spec.num_labels,
                skip_unknown_labels=True,
            )
            if len(data) > self.max_examples:
                rng = np.random.default_rng(0)
                keep = sorted(rng.choice(len(data), self.max_examples, replace=False).tolist())
                data = data.subset(keep)
            model = load_model(spec_of_model, seed=spec.seed)
            self._cache[key] = (model, task.batches(data, spec_of_model))
        return self._cache[key]

    def __call__(
        self, spec: JobSpec, modules: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, float]:
        from fedpilot.worker.model import load_module_state
        from fedpilot.worker.training import evaluate

        model, batches = self._prepare(spec)
        load_module_state(model, modules)
        loss, accuracy = evaluate(model, batches)
        if spec.task == "causal-lm":
            return {
                "eval_loss": loss,
                "eval_perplexity": math.exp(min(loss, 700.0)),
                "eval_token_accuracy": accuracy,
            }
        return {"eval_loss": loss, "eval_accuracy": accuracy}
