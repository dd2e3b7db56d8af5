"""Local training: only assigned modules move, the loss drops, on a tiny and the real model."""

import numpy as np
import pytest
import torch

from fedpilot.datasets import banking77_dir
from fedpilot.worker.data import load_csv, make_batches, select, synthetic_dataset
from fedpilot.worker.model import (
    ModelSpec,
    get_module_state,
    load_model,
    load_tokenizer,
    module_names,
)
from fedpilot.worker.training import evaluate, train

# The copy shipped with the package (or $FEDPILOT_BANKING77).
BANKING77 = banking77_dir()


def _tiny_batches(spec: ModelSpec, n: int = 48, seed: int = 0) -> list:
    data = synthetic_dataset(n, spec.num_labels, seed=seed)
    return make_batches(data, load_tokenizer(spec), batch_size=8, max_seq_len=16)


def _frozen_base(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }


def test_training_moves_only_the_assigned_modules(tiny_spec, tiny_model):
    assigned = ["encoder.layer.1.attention.self.query", "classifier"]
    before = get_module_state(tiny_model)
    base = _frozen_base(tiny_model)

    result = train(tiny_model, assigned, _tiny_batches(tiny_spec), steps=4, lr=1e-2)

    after = get_module_state(tiny_model)
    for name in module_names(tiny_model):
        for key in before[name]:
            same = np.array_equal(before[name][key], after[name][key])
            assert same == (name not in assigned), (name, key)
    for n, p in _frozen_base(tiny_model).items():
        assert torch.equal(p, base[n]), n
    assert result.steps == 4 and result.num_samples == 48


def test_training_lowers_the_loss_and_reports_a_peak(tiny_spec, tiny_model):
    batches = _tiny_batches(tiny_spec)

    result = train(tiny_model, module_names(tiny_model), batches, epochs=20, lr=1e-2, seed=1)

    assert result.loss_after < 0.5 * result.loss_before
    assert result.loss_after == pytest.approx(evaluate(tiny_model, batches)[0])
    assert result.peak_bytes > sum(p.numel() * 4 for p in tiny_model.parameters())
    assert result.seconds > 0


def test_training_is_reproducible_for_a_seed(tiny_spec):
    runs = []
    for _ in range(2):
        model = load_model(tiny_spec)
        train(model, module_names(model), _tiny_batches(tiny_spec), steps=5, seed=3)
        runs.append(get_module_state(model))
    for m in runs[0]:
        for k in runs[0][m]:
            np.testing.assert_array_equal(runs[0][m][k], runs[1][m][k])


def test_an_empty_assignment_changes_nothing(tiny_spec, tiny_model):
    before = get_module_state(tiny_model)

    result = train(tiny_model, [], _tiny_batches(tiny_spec), epochs=2)

    assert result.steps == 0 and result.loss_after == result.loss_before
    after = get_module_state(tiny_model)
    assert all(np.array_equal(before[m][k], after[m][k]) for m in before for k in before[m])


def test_evaluate_reports_loss_and_accuracy(tiny_spec, tiny_model):
    loss, acc = evaluate(tiny_model, _tiny_batches(tiny_spec))
    assert loss > 0 and 0.0 <= acc <= 1.0
    with pytest.raises(ValueError):
        evaluate(tiny_model, [])


def test_banking77_csv_loads_with_stable_label_ids():
    data = load_csv(BANKING77 / "train.csv")
    assert data.num_labels == 77 and len(data) > 9000
    assert list(data.label_names) == sorted(data.label_names)
    small = select(data, classes=10, per_class=5, seed=0)
    assert small.num_labels == 10 and len(small) == 50
    assert small.label_names == data.label_names[:10]
    assert select(data, classes=10, per_class=5, seed=0) == small


@pytest.mark.slow
def test_real_minilm_learns_a_banking77_slice():
    classes, seq_len = 10, 32
    train_data = select(load_csv(BANKING77 / "train.csv"), classes=classes, per_class=30, seed=0)
    test_data = select(load_csv(BANKING77 / "test.csv"), classes=classes, per_class=10, seed=0)
    spec = ModelSpec(num_labels=classes, max_seq_len=seq_len, batch_size=16)
    model = load_model(spec)
    tokenizer = load_tokenizer(spec)
    batches = make_batches(train_data, tokenizer, batch_size=16, max_seq_len=seq_len)
    held_out = make_batches(test_data, tokenizer, batch_size=50, max_seq_len=seq_len)
    _, acc_before = evaluate(model, held_out)

    result = train(model, module_names(model), batches, epochs=3, lr=3e-3, seed=0)

    _, acc_after = evaluate(model, held_out)
    print(
        f"\nMiniLM BANKING77/{classes}: loss {result.loss_before:.3f} -> "
        f"{result.loss_after:.3f}, held-out acc {acc_before:.2f} -> {acc_after:.2f}, "
        f"{result.steps} steps in {result.seconds:.1f}s, peak {result.peak_bytes / 1e6:.1f} MB"
    )
    assert result.loss_after < 0.8 * result.loss_before
    assert acc_after > acc_before + 0.2
