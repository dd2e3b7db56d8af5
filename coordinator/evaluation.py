"""Server-side evaluation of a global adapter on a held-out set.

Optional: it needs the worker extra (torch, transformers, peft). Like a
server-side ``evaluate_fn``, it measures the global model on data the
operator holds; federated evaluation on workers' data is the alternative.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpilot.coordinator.jobspec import JobSpec


class HeldOutEvaluator:
    """Keeps the model and tokenised evaluation batches of each job between rounds."""

    def __init__(self, max_examples: int = 2000) -> None:
        self.max_examples = max_examples
        self._cache: dict[str, tuple[Any, list[Any]]] = {}

    def _prepare(self, spec: JobSpec) -> tuple[Any, list[Any]]:
        from fedpilot.coordinator.export import model_spec
        from fedpilot.worker.data import load_data, make_batches
        from fedpilot.worker.model import load_model, load_tokenizer

        key = spec.model_dump_json(
            include={
                "model",
                "num_labels",
                "lora",
                "max_seq_len",
                "eval_dataset",
                "labels",
                "dtype",
            }
        )
        if key not in self._cache:
            spec_of_model = model_spec(spec)
            data = load_data(
                spec.eval_dataset,
                label_names=spec.labels or None,
                num_labels=spec.num_labels,
                skip_unknown_labels=True,
            )
            if len(data) > self.max_examples:
                rng = np.random.default_rng(0)
                keep = sorted(rng.choice(len(data), self.max_examples, replace=False).tolist())
                data = data.subset(keep)
            model = load_model(spec_of_model, seed=spec.seed)
            batches = make_batches(
                data, load_tokenizer(spec_of_model), batch_size=64, max_seq_len=spec.max_seq_len
            )
            self._cache[key] = (model, batches)
        return self._cache[key]

    def __call__(
        self, spec: JobSpec, modules: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, float]:
        from fedpilot.worker.model import load_module_state
        from fedpilot.worker.training import evaluate

        model, batches = self._prepare(spec)
        load_module_state(model, modules)
        loss, accuracy = evaluate(model, batches)
        return {"eval_loss": loss, "eval_accuracy": accuracy}
