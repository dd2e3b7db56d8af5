"""Module naming, trainability, module state and the PEFT adapter mapping."""

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

from fedpilot.worker.model import (
    HEAD_LAYER,
    ModelSpec,
    default_model_path,
    from_peft_state_dict,
    get_module_state,
    load_model,
    load_module_state,
    module_layers,
    module_names,
    peft_key_map,
    save_adapter,
    set_trainable,
    to_peft_state_dict,
    trainable_modules,
)
from tests.models import TINY_LAYERS


def _randomised(state: dict, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in t.items()}
        for m, t in state.items()
    }


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_module_names_follow_the_model_and_layers_count_from_the_input(tiny_model):
    layers = module_layers(tiny_model)

    expected = {
        f"encoder.layer.{i}.attention.self.{t}": i + 1
        for i in range(TINY_LAYERS)
        for t in ("query", "value")
    }
    expected["classifier"] = HEAD_LAYER
    assert layers == expected
    assert module_names(tiny_model)[-1] == "classifier"


def test_targets_above_the_last_layer_are_head_layer_modules(tiny_spec):
    spec = ModelSpec(**{**tiny_spec.to_dict(), "target_modules": ["dense"]})

    layers = module_layers(load_model(spec))

    assert layers["pooler.dense"] == HEAD_LAYER
    assert layers["encoder.layer.0.intermediate.dense"] == 1
    assert layers["encoder.layer.2.attention.output.dense"] == TINY_LAYERS
    assert len(layers) == 3 * TINY_LAYERS + 2


def test_set_trainable_unfreezes_exactly_the_chosen_modules(tiny_model):
    chosen = ["encoder.layer.1.attention.self.value", "classifier"]

    params = set_trainable(tiny_model, chosen)

    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.default.weight",
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.default.weight",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert len(params) == 4
    assert trainable_modules(tiny_model) == chosen
    with pytest.raises(KeyError):
        set_trainable(tiny_model, ["encoder.layer.9.attention.self.query"])


def test_module_state_has_lora_shapes_and_round_trips(tiny_spec, tiny_model):
    state = get_module_state(tiny_model)
    q = state["encoder.layer.0.attention.self.query"]
    assert set(q) == {"lora_A", "lora_B"}
    assert q["lora_A"].shape == (4, 64) and q["lora_B"].shape == (64, 4)
    assert q["lora_A"].dtype == np.float32
    assert set(state["classifier"]) == {"weight", "bias"}
    assert state["classifier"]["weight"].shape == (3, 64)

    new = _randomised(state)
    other = load_model(tiny_spec, seed=7)
    load_module_state(other, new)
    load_module_state(tiny_model, new)

    back = get_module_state(other)
    for m in new:
        for k in new[m]:
            np.testing.assert_array_equal(back[m][k], new[m][k])
    torch.testing.assert_close(_logits(other), _logits(tiny_model))


def test_load_module_state_checks_everything_before_writing(tiny_model):
    before = get_module_state(tiny_model)
    bad = _randomised(
        {k: before[k] for k in ("classifier", "encoder.layer.0.attention.self.query")}
    )
    bad["encoder.layer.0.attention.self.query"]["lora_A"] = np.zeros((5, 64), np.float32)

    with pytest.raises(ValueError, match="shape"):
        load_module_state(tiny_model, bad)
    with pytest.raises(KeyError):
        load_module_state(tiny_model, {"nope": {}})
    with pytest.raises(ValueError, match="tensors"):
        load_module_state(tiny_model, {"classifier": {"weight": before["classifier"]["weight"]}})

    after = get_module_state(tiny_model)
    np.testing.assert_array_equal(after["classifier"]["weight"], before["classifier"]["weight"])


def test_peft_key_map_covers_every_adapter_tensor_once(tiny_model):
    keys = peft_key_map(tiny_model)

    flat = [key for m in keys.values() for key in m.values()]
    assert sorted(flat) == sorted(get_peft_model_state_dict(tiny_model))
    assert len(set(flat)) == len(flat)
    assert set(keys) == set(module_names(tiny_model))

    state = get_module_state(tiny_model)
    tensors = to_peft_state_dict(tiny_model, state)
    assert set(tensors) == set(flat)
    back = from_peft_state_dict(tiny_model, get_peft_model_state_dict(tiny_model))
    for m in state:
        for k in state[m]:
            np.testing.assert_array_equal(back[m][k], state[m][k])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_saved_adapter_is_a_standard_peft_adapter(tiny_dir: Path, tiny_model, tmp_path: Path):
    state = _randomised(get_module_state(tiny_model), seed=3)

    out = save_adapter(tiny_model, tmp_path / "adapter", state)

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=3)
    loaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(_logits(loaded), _logits(tiny_model))
    assert (out / "adapter_config.json").is_file()


def test_spec_validates_and_round_trips():
    spec = ModelSpec(num_labels=5, target_modules=["query"])
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    for bad in ({"lora_rank": 0}, {"dtype": "int8"}, {"lora_dropout": 1.0}, {"target_modules": []}):
        with pytest.raises(ValueError):
            ModelSpec(**bad)


def test_default_model_is_the_bundled_minilm_and_loading_never_downloads(tmp_path: Path):
    path = default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError):
        load_model(ModelSpec(model_path=str(tmp_path / "sentence-transformers/all-MiniLM-L6-v2")))
