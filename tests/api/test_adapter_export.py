"""`GET /jobs/{id}/adapter` and `fedpilot adapter`: a standard PEFT adapter that loads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from typer.testing import CliRunner

from fedpilot.cli import app
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.core.aggregation import flatten
from fedpilot.wire.payload import encode_tensors
from fedpilot.worker.model import ModelSpec, get_module_state, load_model
from tests.api.conftest import TOKEN, Api

LABELS = ["neg", "pos", "neutral"]


def _commit_trained_adapter(api: Api, tiny_dir: Path) -> tuple[str, dict]:
    """A job on the tiny model with version 1 = a random (non-initial) adapter state."""
    spec = {"name": "export", "model": str(tiny_dir), "labels": LABELS, "lora": {"rank": 4}}
    job_id = api.http.post("/api/v1/jobs", json=spec).json()["id"]
    model = load_model(ModelSpec(model_path=str(tiny_dir), num_labels=3, lora_rank=4), seed=3)
    rng = np.random.default_rng(0)
    state = {
        name: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tensors.items()}
        for name, tensors in get_module_state(model).items()
    }
    data, _ = encode_tensors(flatten(state))
    blobs = _blobs(api)
    sha, size = blobs.put_bytes(data)
    store = api.coordinator.store
    assert store.commit_version(job_id, version=0, round_number=0, sha256=sha, byte_count=size)
    assert store.commit_version(job_id, version=1, round_number=1, sha256=sha, byte_count=size)
    return job_id, state


def _blobs(api: Api) -> BlobStore:
    return api.coordinator.driver.blobs


def _check_loads(adapter_dir: Path, tiny_dir: Path, state: dict) -> None:
    from transformers import AutoModelForSequenceClassification

    assert {p.name for p in adapter_dir.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(adapter_dir))
    got = get_module_state(loaded)
    assert set(got) == set(state)
    for name, tensors in state.items():
        for key, value in tensors.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}/{key}")
    # The adapter changes the model's output (it is not a no-op export).
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
        adapted = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


def test_adapter_zip_is_a_loadable_peft_adapter(api: Api, tiny_dir: Path, tmp_path: Path) -> None:
    job_id, state = _commit_trained_adapter(api, tiny_dir)
    response = api.http.get(f"/api/v1/jobs/{job_id}/adapter")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["x-fedpilot-adapter-version"] == "1"
    out = tmp_path / "adapter"
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(out)
    _check_loads(out, tiny_dir, state)
    # An older version on request; an absent one is a 404.
    assert api.http.get(f"/api/v1/jobs/{job_id}/adapter", params={"version": 0}).status_code == 200
    assert api.http.get(f"/api/v1/jobs/{job_id}/adapter", params={"version": 7}).status_code == 404


def test_cli_adapter_and_status(api: Api, tiny_dir: Path, tmp_path: Path) -> None:
    job_id, state = _commit_trained_adapter(api, tiny_dir)
    runner = CliRunner()
    env = {"FEDPILOT_API_URL": api.url, "FEDPILOT_API_TOKEN": TOKEN}
    out = tmp_path / "cli-adapter"
    result = runner.invoke(app, ["adapter", job_id, "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "version 1" in result.output
    _check_loads(out, tiny_dir, state)

    result = runner.invoke(app, ["jobs"], env=env)
    assert result.exit_code == 0 and "export" in result.output
    result = runner.invoke(app, ["status", job_id, "--json"], env=env)
    assert result.exit_code == 0 and f'"id": "{job_id}"' in result.output
    refused = runner.invoke(app, ["jobs"], env={**env, "FEDPILOT_API_TOKEN": "wrong"})
    assert refused.exit_code == 1 and "invalid bearer token" in refused.output
