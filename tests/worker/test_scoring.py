"""Local IG scores: finite, per module, exact under a constructed gradient scaling."""

import numpy as np
import pytest
import torch

from fedpilot.worker.data import make_batches, synthetic_dataset
from fedpilot.worker.model import (
    get_module_state,
    load_module_state,
    load_tokenizer,
    module_entries,
    module_names,
    set_trainable,
)
from fedpilot.worker.scoring import local_ig_scores


@pytest.fixture
def probe(tiny_spec) -> list:
    data = synthetic_dataset(12, tiny_spec.num_labels, seed=5)
    return make_batches(data, load_tokenizer(tiny_spec), batch_size=4, max_seq_len=16)


def _reference(model, batches) -> dict[str, float]:
    """Per-example squared gradient norms, the plain way: eval mode, full padded examples."""
    set_trainable(model, module_names(model))
    model.eval()
    entries = module_entries(model)
    totals, n = dict.fromkeys(entries, 0.0), 0
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            model.zero_grad(set_to_none=True)
            model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
            for name, e in entries.items():
                totals[name] += sum(float(p.grad.pow(2).sum()) for p in e.params().values())
            n += 1
    return {k: v / n for k, v in totals.items()}


def test_scores_cover_every_module_and_are_finite(tiny_model, probe):
    scores = local_ig_scores(tiny_model, probe)

    assert set(scores) == set(module_names(tiny_model))
    assert all(np.isfinite(s) and s >= 0 for s in scores.values())
    assert scores["classifier"] > 0


def test_scores_equal_the_plain_per_example_fisher(tiny_model, probe):
    seen = []
    for layer in tiny_model.base_model.model.bert.encoder.layer:
        layer.register_forward_pre_hook(
            lambda mod, args: seen.append(mod.gradient_checkpointing and mod.training)
        )

    scores = local_ig_scores(tiny_model, probe)

    assert seen and all(seen)  # every layer ran checkpointed
    expected = _reference(tiny_model, probe)
    for name in scores:
        assert scores[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-12), name


def test_scaling_a_modules_input_factor_scales_its_score_quadratically(tiny_model, probe):
    # With lora_B = 0 (fresh LoRA) the forward ignores lora_A, and grad(lora_B)
    # is linear in lora_A: scaling one module's A by 10 multiplies its score by 100
    # and leaves every other score unchanged.
    target = "encoder.layer.1.attention.self.value"
    before = local_ig_scores(tiny_model, probe)
    state = get_module_state(tiny_model, [target])
    assert not state[target]["lora_B"].any()
    state[target]["lora_A"] = state[target]["lora_A"] * 10
    load_module_state(tiny_model, state)

    after = local_ig_scores(tiny_model, probe)

    for name in before:
        factor = 100.0 if name == target else 1.0
        assert after[name] == pytest.approx(factor * before[name], rel=1e-4), name
    assert before[target] > 0


def test_probe_restores_flags_modes_and_checkpointing(tiny_model, probe):
    set_trainable(tiny_model, ["classifier"])
    tiny_model.eval()
    flags = [p.requires_grad for p in tiny_model.parameters()]

    local_ig_scores(tiny_model, probe, max_examples=2)

    assert flags == [p.requires_grad for p in tiny_model.parameters()]
    assert not any(m.training for m in tiny_model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_model.modules())
    assert all(p.grad is None for p in tiny_model.parameters())
    with pytest.raises(ValueError):
        local_ig_scores(tiny_model, [])


def test_probe_leaves_training_as_shallow_as_before(tiny_model, probe):
    # Training only the head must not back-propagate into the encoder after a probe.
    from fedpilot.worker.profiling import measure_training_peak

    hooks = {m: dict(m._forward_hooks) for m in tiny_model.modules()}
    before = measure_training_peak(tiny_model, ["classifier"], probe[0])
    local_ig_scores(tiny_model, probe, max_examples=2)
    assert {m: dict(m._forward_hooks) for m in tiny_model.modules()} == hooks
    after = measure_training_peak(tiny_model, ["classifier"], probe[0])
    assert after <= before * 1.05


def test_max_examples_limits_the_probe(tiny_model, probe):
    first = local_ig_scores(tiny_model, probe[:1], max_examples=1)
    assert first == local_ig_scores(tiny_model, probe, max_examples=1)
    assert first != local_ig_scores(tiny_model, probe, max_examples=3)
    assert torch.is_grad_enabled()
