"""Causal-LM and image-classification jobs through the real cluster.

Coordinator and two workers run as OS processes talking gRPC, with state in
PostgreSQL. Each job runs two rounds on a tiny model built from a config (a
Llama-style decoder with a BPE tokenizer trained on the instructions; a ViT on
scikit-learn's digits) and must lower the held-out loss, keep every assignment
within its worker's budget, and export an adapter that PEFT loads.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from peft import PeftModel

from fedpilot.cluster import LocalCluster
from fedpilot.coordinator.evaluation import HeldOutEvaluator
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.aggregation import unflatten
from fedpilot.wire.payload import BFLOAT16, decode_tensors
from fedpilot.worker.model import ModelSpec, load_model
from fedpilot.worker.profiling import dummy_batch, profile_memory
from tests.models import (
    instruction_rows,
    save_digits_folder,
    save_tiny_llama,
    save_tiny_vit,
    write_jsonl,
)
from tests.test_cluster import wait_for

DIGITS = [str(d) for d in range(10)]


def _budgets(spec: ModelSpec) -> tuple[int, int]:
    """A worker that fits only the top layer and the head, and one that fits everything."""
    model = load_model(spec)
    memory = profile_memory(model, dummy_batch(model, spec.batch_size, spec.max_seq_len))
    top = [m.name for m in memory.modules if m.layer in (0, memory.num_layers)]
    return int(memory.cost(top) * 1.10), int(memory.full_cost() * 1.5)


def _run_job(
    tmp_path: Path, pg_url: str, job: dict[str, Any], data: tuple[Path, Path], spec: ModelSpec
) -> tuple[LocalCluster, str, JobSpec]:
    small, large = _budgets(spec)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    cluster = LocalCluster(tmp_path / "cluster", db_url=pg_url)
    cluster.start_coordinator(job=job_file)
    cluster.start_worker("small", data[0], small)
    cluster.start_worker("large", data[1], large)
    (row,) = cluster.store.jobs()
    return cluster, row.id, JobSpec.model_validate(job)


def _check_run(cluster: LocalCluster, job_id: str, spec: JobSpec) -> list[float]:
    """Done in two rounds, both workers in each, no budget exceeded; held-out losses of
    versions 0 (the initial adapter), 1 and 2."""
    job = wait_for(cluster, job_id, {"done", "failed"}, timeout_s=600)
    assert job.state == "done", job.error
    store = cluster.store
    budgets = {w.id: w.budget_bytes for w in store.workers()}
    for number in (1, 2):
        tasks = store.tasks(job_id, number, "train")
        assert len(tasks) == 2 and all(t.status == "done" for t in tasks)
        for t in tasks:
            assert 0 < t.predicted_bytes <= budgets[t.worker_id]
        updates = store.updates(job_id, number)
        assert len(updates) == 2
        for u in updates:
            assert 0 < u.measured_peak_bytes <= budgets[u.worker_id]
    version0 = store.version(job_id, 0)
    assert version0 is not None
    initial = unflatten(_blob(cluster, version0.sha256))
    before = HeldOutEvaluator()(spec, initial)["eval_loss"]
    after = [store.round(job_id, n).metrics["eval_loss"] for n in (1, 2)]
    return [before, *after]


def _blob(cluster: LocalCluster, sha256: str) -> dict[str, np.ndarray]:
    """Tensors of a stored blob (an adapter version or an upload), read from the blob folder."""
    return decode_tensors((cluster.data_dir / "blobs" / sha256[:2] / sha256).read_bytes())


def _adapter_dir(cluster: LocalCluster, job_id: str, out: Path) -> Path:
    reply = httpx.get(f"{cluster.http_url}/api/v1/jobs/{job_id}/adapter", timeout=60)
    assert reply.status_code == 200, reply.text
    zipfile.ZipFile(io.BytesIO(reply.content)).extractall(out)
    return out


# -- causal LM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_causal_lm_job_lowers_held_out_loss_and_exports(
    tmp_path: Path, pg_url: str, llama_dir: Path
) -> None:
    # Prepare: two workers with their own instructions, a held-out set, all linear layers.
    job = {
        "name": "sft",
        "task": "causal-lm",
        "model": str(llama_dir),
        "rounds": 2,
        "min_workers": 2,
        "local_steps": 8,
        "batch_size": 8,
        "max_seq_len": 40,
        "learning_rate": 0.01,
        "round_deadline_s": 300,
        "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
        "payload_dtype": "bfloat16",
        "ig_probe_batches": 1,
        "eval_dataset": str(write_jsonl(tmp_path / "eval.jsonl", instruction_rows(64, seed=9))),
    }
    data = (
        write_jsonl(tmp_path / "a.jsonl", instruction_rows(160, seed=1)),
        write_jsonl(tmp_path / "b.jsonl", instruction_rows(160, seed=2)),
    )
    spec = ModelSpec(
        model_path=str(llama_dir),
        task="causal-lm",
        lora_rank=4,
        lora_alpha=8,
        target_modules=("all-linear",),
        max_seq_len=40,
        batch_size=8,
    )

    # Execute
    cluster, job_id, job_spec = _run_job(tmp_path, pg_url, job, data, spec)
    with cluster:
        losses = _check_run(cluster, job_id, job_spec)
        final = cluster.store.round(job_id, 2).metrics
        adapter = _adapter_dir(cluster, job_id, tmp_path / "adapter")
        uploads = [_blob(cluster, u.sha256) for u in cluster.store.updates(job_id, 1)]

    # Assert: updates travelled as bfloat16; held-out loss falls round after round.
    assert {x.dtype for u in uploads for x in u.values()} == {BFLOAT16}
    assert losses[0] > losses[1] > losses[2], losses
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    _check_causal_adapter(llama_dir, adapter, job_spec, final["eval_loss"])


def _check_causal_adapter(base_dir: Path, adapter: Path, spec: JobSpec, eval_loss: float) -> None:
    """PEFT reloads the export on AutoModelForCausalLM; it computes the coordinator's held-out
    loss, and ``merge_and_unload`` gives the same logits without PEFT."""
    from transformers import AutoModelForCausalLM

    from fedpilot.coordinator.export import model_spec
    from fedpilot.worker.tasks import get_task, read_local_data
    from fedpilot.worker.training import evaluate

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = PeftModel.from_pretrained(base, adapter)
    task = get_task("causal-lm")
    data = task.dataset(read_local_data(spec.eval_dataset), label_names=None, num_labels=None)
    batches = task.batches(data, model_spec(spec, batch_size=64))
    loss, _ = evaluate(peft_model, batches)
    assert loss == pytest.approx(eval_loss, rel=1e-4)
    peft_model.eval()
    with torch.no_grad():
        ids = batches[0]["input_ids"][:4]
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


# -- image classification ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


def test_vit_job_on_digits_lowers_held_out_loss_and_exports(
    tmp_path: Path, pg_url: str, vit_dir: Path
) -> None:
    # Prepare: digits as image folders, disjoint between the workers and the held-out set.
    job = {
        "name": "digits",
        "task": "image-classification",
        "model": str(vit_dir),
        "labels": DIGITS,
        "rounds": 2,
        "min_workers": 2,
        "local_steps": 10,
        "batch_size": 16,
        "learning_rate": 0.01,
        "round_deadline_s": 300,
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "ig_probe_batches": 1,
        "eval_dataset": str(save_digits_folder(tmp_path / "eval", range(1400, 1797))),
    }
    data = (
        save_digits_folder(tmp_path / "a", range(0, 700)),
        save_digits_folder(tmp_path / "b", range(700, 1400)),
    )
    spec = ModelSpec(
        model_path=str(vit_dir),
        task="image-classification",
        num_labels=10,
        lora_rank=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj"),
        batch_size=16,
    )

    # Execute
    cluster, job_id, job_spec = _run_job(tmp_path, pg_url, job, data, spec)
    with cluster:
        losses = _check_run(cluster, job_id, job_spec)
        final = cluster.store.round(job_id, 2).metrics
        adapter = _adapter_dir(cluster, job_id, tmp_path / "adapter")

    # Assert
    assert losses[0] > losses[1] > losses[2], losses
    assert final["eval_accuracy"] > 0.1  # above chance on ten classes
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    _check_image_adapter(vit_dir, adapter, job_spec, final["eval_loss"])


def _check_image_adapter(base_dir: Path, adapter: Path, spec: JobSpec, eval_loss: float) -> None:
    from transformers import AutoModelForImageClassification

    from fedpilot.coordinator.export import model_spec
    from fedpilot.worker.tasks import get_task, read_local_data
    from fedpilot.worker.training import evaluate

    base = AutoModelForImageClassification.from_pretrained(base_dir, num_labels=10)
    peft_model = PeftModel.from_pretrained(base, adapter)
    task = get_task("image-classification")
    data = task.dataset(
        read_local_data(spec.eval_dataset), label_names=spec.labels, num_labels=None
    )
    loss, _ = evaluate(peft_model, task.batches(data, model_spec(spec, batch_size=64)))
    assert loss == pytest.approx(eval_loss, rel=1e-4)
