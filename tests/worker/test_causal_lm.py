"""Causal-LM fine-tuning on the worker: instruction data, response-only labels, a Llama-style
decoder with LoRA on every linear layer, depth-aware memory and real training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedpilot.cli import app
from fedpilot.core.memory import memory_from_json
from fedpilot.worker.data import DataError
from fedpilot.worker.model import (
    ModelSpec,
    compute_dtype,
    load_model,
    load_tokenizer,
    module_entries,
    module_layers,
    trainable_modules,
)
from fedpilot.worker.profiling import dummy_batch, profile_memory
from fedpilot.worker.scoring import local_ig_scores
from fedpilot.worker.targets import peft_targets
from fedpilot.worker.tasks import data_task, get_task, read_local_data
from fedpilot.worker.tasks.causal_lm import IGNORE, encode, make_batches, read_conversations
from fedpilot.worker.training import evaluate, train
from tests.models import (
    TINY_LAYERS,
    instruction_rows,
    save_tiny_gpt2,
    save_tiny_llama,
    write_jsonl,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def plain_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama-plain"), chat_template=False)


def _spec(path: Path, targets: tuple[str, ...] = ("all-linear",), **kw: object) -> ModelSpec:
    options: dict[str, object] = {"lora_rank": 4, "lora_alpha": 8, "max_seq_len": 40}
    options.update(kw)
    return ModelSpec(
        model_path=str(path),
        task="causal-lm",
        target_modules=targets,
        **options,  # type: ignore[arg-type]
    )


def _response_text(tokenizer: object, ids: list[int], labels: list[int]) -> str:
    kept = [i for i, y in zip(ids, labels, strict=True) if y != IGNORE]
    return str(tokenizer.decode(kept))  # type: ignore[attr-defined]


# -- data ------------------------------------------------------------------------------------


def test_instruction_rows_become_one_user_and_one_assistant_turn(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Reverse the words.", "input": "red cat", "output": "cat red"},
            {"instruction": "Say hi.", "output": "hi"},
        ],
    )
    data = read_conversations(path)
    assert data.conversations[0] == (
        ("user", "Reverse the words.\n\nred cat"),
        ("assistant", "cat red"),
    )
    assert data.conversations[1] == (("user", "Say hi."), ("assistant", "hi"))
    assert data_task(path) == "causal-lm"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"instruction": "x"}, "'instruction' and 'output' must not be empty"),
        ({"instruction": "x", "output": 3}, "'output' must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": []}, "non-empty list"),
    ],
)
def test_bad_instruction_lines_are_named(tmp_path: Path, line: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, line])
    with pytest.raises(DataError, match=message) as error:
        read_conversations(path)
    assert "line 2" in str(error.value)


def test_chat_template_labels_only_the_response(llama_dir: Path) -> None:
    tokenizer = load_tokenizer(_spec(llama_dir))
    conv = (("user", "Reverse the words.\n\nred cat"), ("assistant", "cat red"))
    ids, labels = encode(tokenizer, conv, 200)
    assert tokenizer.decode(ids).startswith("<|user|>")
    assert _response_text(tokenizer, ids, labels) == "cat red</s>\n"
    assert labels[: ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1] == [IGNORE] * (
        ids.index(tokenizer.convert_tokens_to_ids("<|assistant|>")) + 1
    )


def test_every_assistant_turn_of_a_chat_is_a_target(llama_dir: Path) -> None:
    tokenizer = load_tokenizer(_spec(llama_dir))
    conv = (
        ("system", "Be brief."),
        ("user", "Say red."),
        ("assistant", "red"),
        ("user", "Say blue."),
        ("assistant", "blue"),
    )
    ids, labels = encode(tokenizer, conv, 200)
    assert _response_text(tokenizer, ids, labels) == "red</s>\nblue</s>\n"


def test_plain_template_without_a_chat_template(plain_llama_dir: Path) -> None:
    tokenizer = load_tokenizer(_spec(plain_llama_dir))
    assert not tokenizer.chat_template
    conv = (("user", "Say hi."), ("assistant", "hi"))
    ids, labels = encode(tokenizer, conv, 200)
    text = tokenizer.decode(ids)
    assert text.startswith("<s>### User:\nSay hi.\n\n### Assistant:\nhi</s>")
    assert _response_text(tokenizer, ids, labels) == "hi</s>"


def test_batches_pad_right_to_max_len_and_drop_examples_cut_before_the_response(
    llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = load_tokenizer(_spec(llama_dir))
    long_prompt = {"instruction": " ".join(["red"] * 60), "output": "cat"}
    rows = [long_prompt, *instruction_rows(5)]
    data = read_conversations(write_jsonl(tmp_path / "d.jsonl", rows))
    with caplog.at_level(logging.WARNING):
        batches = make_batches(data, tokenizer, batch_size=4, max_seq_len=24)
    assert "1 of 6 examples have no response token" in caplog.text
    assert [b["input_ids"].shape for b in batches] == [(4, 24), (1, 24)]
    for b in batches:
        padding = b["attention_mask"] == 0
        assert bool((b["labels"][padding] == IGNORE).all())
        assert bool((b["input_ids"][padding] == tokenizer.pad_token_id).all())
        assert bool(((b["labels"] != IGNORE).sum(1) > 0).all())
    with pytest.raises(DataError, match="no example keeps a response token"):
        make_batches(data.subset([0]), tokenizer, batch_size=4, max_seq_len=24)


def test_text_data_for_a_causal_job_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,0\n")
    data = read_local_data(path)
    assert data.task == "sequence-classification"
    with pytest.raises(DataError, match="holds sequence-classification data"):
        get_task("causal-lm").dataset(data, label_names=None, num_labels=2)


# -- model and targets -----------------------------------------------------------------------


def test_all_linear_adapts_every_projection_and_freezes_lm_head(llama_dir: Path) -> None:
    model = load_model(_spec(llama_dir))
    layers = module_layers(model)
    assert len(layers) == len(PROJECTIONS) * TINY_LAYERS
    for i in range(TINY_LAYERS):
        for p in PROJECTIONS:
            group = "mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            assert layers[f"layers.{i}.{group}.{p}"] == i + 1
    assert not any("lm_head" in name for name in layers)
    assert not model.get_base_model().lm_head.weight.requires_grad
    assert set(trainable_modules(model)) <= set(layers)


def test_targets_by_name_list_and_by_pattern(llama_dir: Path) -> None:
    by_names = module_layers(load_model(_spec(llama_dir, ("q_proj", "v_proj"))))
    pattern = r".*layers\.[01]\.self_attn\.(q|v)_proj"
    by_pattern = module_layers(load_model(_spec(llama_dir, (pattern,))))
    assert len(by_names) == 2 * TINY_LAYERS
    assert sorted(by_pattern) == sorted(
        n for n in by_names if n.startswith(("layers.0", "layers.1"))
    )


def test_gpt2_blocks_under_transformer_h_get_their_depth(tmp_path: Path) -> None:
    """Another family: ``transformer.h.N`` blocks and fused ``Conv1D`` projections."""
    spec = _spec(save_tiny_gpt2(tmp_path / "gpt2"), ("c_attn", "c_proj"), max_seq_len=32)
    model = load_model(spec)
    layers = module_layers(model)
    assert {layers[f"h.{i}.attn.c_attn"] for i in range(TINY_LAYERS)} == {1, 2, 3}
    assert layers[f"h.{TINY_LAYERS - 1}.mlp.c_proj"] == TINY_LAYERS
    memory = profile_memory(model, dummy_batch(model, 4, 32))
    costs = [memory.cost([f"h.{i}.attn.c_attn"]) for i in range(TINY_LAYERS)]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ((), "must not be empty"),
        (("all-linear", "q_proj"), "must be the only target"),
        (("q_proj", ".*v_proj"), "a pattern must be the only target"),
        (("(unclosed",), "must start with"),
        ((".*(unclosed",), "not a regular expression"),
    ],
)
def test_bad_targets_are_refused(targets: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peft_targets(targets)


def test_float16_on_cpu_falls_back_to_float32_and_bfloat16_runs(
    llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert compute_dtype("float16", "cpu") == torch.float32
    assert "float16 compute is not supported on CPU" in caplog.text
    model = load_model(_spec(llama_dir, dtype="bfloat16"))
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    entries = module_entries(model)
    assert all(p.dtype == torch.float32 for e in entries.values() for p in e.params().values())


# -- training, scoring, memory --------------------------------------------------------------


def test_training_all_layers_lowers_the_response_loss(llama_dir: Path, tmp_path: Path) -> None:
    spec = _spec(llama_dir, batch_size=8)
    model = load_model(spec)
    task = get_task("causal-lm")
    local = read_local_data(write_jsonl(tmp_path / "d.jsonl", instruction_rows(96, seed=3)))
    batches = task.batches(task.dataset(local, label_names=None, num_labels=None), spec)
    loss_before, _ = evaluate(model, batches)
    scores = local_ig_scores(model, batches[:1], max_examples=4)
    assert set(scores) == set(module_layers(model)) and max(scores.values()) > 0
    result = train(model, list(scores), batches, steps=12, lr=0.01, measure_peak=False)
    assert result.loss_before == pytest.approx(loss_before)
    assert result.loss_after < loss_before - 0.3


def test_profile_command_shows_lower_layers_cost_more(llama_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "profile",
            "--task",
            "causal-lm",
            "--model",
            str(llama_dir),
            "--target-modules",
            "q_proj,v_proj,down_proj",
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    memory = memory_from_json(json.loads(result.output))
    assert memory.num_layers == TINY_LAYERS
    assert all(a > 0 for a in memory.layer_activation_bytes)
    for proj in ("self_attn.q_proj", "mlp.down_proj"):
        costs = [memory.cost([f"layers.{i}.{proj}"]) for i in range(TINY_LAYERS)]
        assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1], (proj, costs)
