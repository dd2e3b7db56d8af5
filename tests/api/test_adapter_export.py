"""`GET /jobs/{id}/adapter` and `fedpilot adapter`: a standard PEFT adapter that loads.

The coordinator writes the adapter with numpy and safetensors only; these tests
load what it writes with PEFT (torch here) and compare it with what PEFT's own
``save_pretrained`` writes for the same tensors, on several architectures.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fedpilot.cli import app
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.export import (
    _PREFIX_BY_MODEL_TYPE,
    DEFAULT_MODEL_TYPE,
    ExportError,
    backbone_prefix,
    peft_tensors,
    write_adapter_dir,
)
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.aggregation import flatten
from fedpilot.wire.payload import encode_tensors
from fedpilot.worker.model import (
    ModelSpec,
    default_model_path,
    get_module_state,
    load_model,
    save_adapter,
)
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


# ------------------------------------------------------------ torch-free export


def _random_state(model: PeftModel, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        name: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in tensors.items()}
        for name, tensors in get_module_state(model).items()
    }


def test_export_runs_without_torch(tiny_dir: Path, tmp_path: Path) -> None:
    """What the coordinator image has: torch, transformers and peft cannot be imported."""
    model = load_model(ModelSpec(model_path=str(tiny_dir), num_labels=3, lora_rank=4), seed=3)
    state = _random_state(model)
    np.savez(
        tmp_path / "state.npz", **{f"{m}|{t}": v for m, ts in state.items() for t, v in ts.items()}
    )
    spec = {"name": "no-torch", "model": str(tiny_dir), "labels": LABELS, "lora": {"rank": 4}}
    script = """
import json, sys
from pathlib import Path
for name in ("torch", "transformers", "peft", "accelerate"):
    sys.modules[name] = None  # any import of them raises ImportError
import numpy as np
from fedpilot.coordinator.export import write_adapter_dir
from fedpilot.coordinator.jobspec import JobSpec
work = Path(sys.argv[1])
state = {}
for key, value in np.load(work / "state.npz").items():
    module, tensor = key.split("|")
    state.setdefault(module, {})[tensor] = value
spec = JobSpec.model_validate(json.loads(sys.argv[2]))
write_adapter_dir(spec, state, work / "adapter")
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in
                ("torch", "transformers", "peft"))
assert not loaded, loaded
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    _check_loads(tmp_path / "adapter", tiny_dir, state)


def _tiny(model_type: str, path: Path) -> tuple[Path, tuple[str, ...]]:
    """A random 2-layer model of ``model_type`` saved as a local directory, and its targets."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    common = {"vocab_size": 99, "num_labels": 3, "pad_token_id": 0}
    if model_type == "llama":
        config = AutoConfig.for_model(
            "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, **common,
        )  # fmt: skip
        targets: tuple[str, ...] = ("q_proj", "v_proj")
    elif model_type == "distilbert":
        config = AutoConfig.for_model(
            "distilbert", dim=32, hidden_dim=48, n_layers=2, n_heads=4, **common
        )
        targets = ("q_lin", "v_lin")
    else:
        config = AutoConfig.for_model(
            model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, **common,
        )  # fmt: skip
        targets = ("query", "value")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path, targets


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "distilbert", "llama"])
def test_export_matches_peft_save_pretrained(model_type: str, tmp_path: Path) -> None:
    model_dir, targets = _tiny(model_type, tmp_path / "model")
    model = load_model(
        ModelSpec(model_path=str(model_dir), num_labels=3, lora_rank=4, target_modules=targets),
        seed=1,
    )
    state = _random_state(model, seed=2)
    spec = JobSpec.model_validate(
        {
            "name": model_type,
            "model": str(model_dir),
            "labels": LABELS,
            "lora": {"rank": 4, "target_modules": list(targets)},
        }
    )
    ours = write_adapter_dir(spec, state, tmp_path / "ours")
    theirs = save_adapter(model, tmp_path / "theirs", state)
    mine, peft_own = (load_file(d / "adapter_model.safetensors") for d in (ours, theirs))
    assert set(mine) == set(peft_own)
    for key, value in peft_own.items():
        np.testing.assert_array_equal(mine[key], value, err_msg=key)
    config = json.loads((ours / "adapter_config.json").read_text())
    reference = json.loads((theirs / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out"):
        assert config[field] == reference[field], field
    assert sorted(config["target_modules"]) == sorted(reference["target_modules"])

    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(ours))
    got = get_module_state(loaded)
    assert set(got) == set(state), "PEFT wraps other modules than the job trained"
    for name, tensors in state.items():
        for key, value in tensors.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}/{key}")


def test_backbone_prefixes_are_those_of_transformers() -> None:
    """Every listed model type, and model types used as their own prefix."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQ_CLS,
    )

    own = [
        "bert",
        "roberta",
        "electra",
        "albert",
        "distilbert",
        "deberta",
        "mpnet",
        DEFAULT_MODEL_TYPE,
    ]
    for model_type in [*_PREFIX_BY_MODEL_TYPE, *own]:
        cls = getattr(transformers, SEQ_CLS[model_type])
        assert backbone_prefix(model_type) == cls.base_model_prefix, model_type


def test_the_default_model_is_the_default_model_type() -> None:
    config = json.loads((default_model_path() / "config.json").read_text())
    assert config["model_type"] == DEFAULT_MODEL_TYPE


def test_hostile_tensors_and_unreadable_models_are_refused(tmp_path: Path) -> None:
    good = {"lora_A": np.ones((2, 4), np.float32), "lora_B": np.ones((4, 2), np.float32)}
    assert set(peft_tensors({"layer.0.q": good}, "bert")) == {
        "base_model.model.bert.layer.0.q.lora_A.weight",
        "base_model.model.bert.layer.0.q.lora_B.weight",
    }
    with pytest.raises(ExportError, match="non-finite"):
        peft_tensors({"layer.0.q": {**good, "lora_B": np.full((4, 2), np.nan)}}, "bert")
    with pytest.raises(ExportError, match="mixes"):
        peft_tensors({"layer.0.q": {"lora_A": good["lora_A"], "weight": good["lora_B"]}}, "bert")
    with pytest.raises(ExportError, match="no tensors"):
        peft_tensors({"classifier": {}}, "bert")
    (tmp_path / "model").mkdir()
    spec = JobSpec.model_validate({"name": "x", "model": str(tmp_path / "model"), "labels": LABELS})
    with pytest.raises(ExportError, match=r"config\.json"):
        write_adapter_dir(spec, {"layer.0.q": good}, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written for a refused export"
