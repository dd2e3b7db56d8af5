"""Supervised fine-tuning of a causal language model on instructions or chats.

Data: JSON Lines, one example per line, either

* ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional), read as
  a user turn (instruction, a blank line, input) and an assistant turn (output); or
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
  ending with an assistant turn.

Rendering: the tokenizer's chat template when it has one; otherwise the plain
template :data:`PLAIN_TURN` (``### User:`` / ``### Assistant:`` headers, each
assistant turn closed by the EOS token), after the BOS token when there is one.

Loss only on responses: every token of an assistant turn (and its closing
token) is a label; prompts, system text, template markup and padding are
``-100``. The chat template is rendered prefix by prefix to find where each
assistant turn starts and ends, and each piece is tokenized on its own.

Batches are padded on the right to ``max_seq_len`` (no packing): the memory
profile is measured at that shape, so a real step never exceeds its
prediction. Sequences longer than ``max_seq_len`` are cut at the end; an
example left without a response token is dropped and counted in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpilot.worker.data import Batch, DataError

IGNORE = -100
"""Label of a token that does not count in the loss (HF's ``ignore_index``)."""
ROLES = ("system", "user", "assistant")
PLAIN_TURN = "### {role}:\n{content}"
"""The plain template of one turn, for tokenizers without a chat template."""
_JSONL_SUFFIXES = (".jsonl", ".ndjson")

log = logging.getLogger(__name__)

Message = tuple[str, str]
"""(role, content)."""


@dataclass(frozen=True)
class Conversations:
    """Instruction examples as conversations ending with an assistant turn."""

    conversations: tuple[tuple[Message, ...], ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.conversations)

    def subset(self, indices: Iterable[int]) -> Conversations:
        return Conversations(tuple(self.conversations[i] for i in indices), self.source)


def is_instruction_record(obj: object) -> bool:
    """Whether a JSON object is an instruction example (rather than a labelled text)."""
    return isinstance(obj, dict) and ("messages" in obj or "instruction" in obj)


def _messages(obj: dict[str, Any], where: str) -> tuple[Message, ...]:
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise DataError(f"{where}: message {i} is not an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(f"{where}: message {i} has role {role!r}; use one of {ROLES}")
            if not isinstance(content, str):
                raise DataError(f"{where}: message {i} content must be a string")
            out.append((role, content))
        if out[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's response")
        return tuple(out)
    fields = {k: obj.get(k, "") for k in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {value!r}")
    if not fields["instruction"].strip() or not fields["output"]:
        raise DataError(f"{where}: 'instruction' and 'output' must not be empty")
    prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    return (("user", prompt), ("assistant", fields["output"]))


def read_conversations(path: str | Path) -> Conversations:
    """Read instruction JSON Lines; :class:`DataError` names the file and line of a problem."""
    p = Path(path)
    if p.suffix.lower() not in _JSONL_SUFFIXES:
        raise DataError(f"{p}: instruction data must be JSON Lines (.jsonl), one example a line")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    out = []
    try:
        with p.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{p}: line {number}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where} is not valid JSON: {e.msg}") from e
                if not is_instruction_record(obj):
                    raise DataError(
                        f"{where}: expected an object with 'instruction' and 'output', "
                        "or with 'messages'"
                    )
                out.append(_messages(obj, where))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not out:
        raise DataError(f"{p}: no examples")
    return Conversations(tuple(out), str(p))


# -- rendering and tokenization -----------------------------------------------------------


def _segments_chat(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of the chat template's rendering, in order."""
    dicts = [{"role": r, "content": c} for r, c in messages]

    def render(upto: int, prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            dicts[:upto], tokenize=False, add_generation_prompt=prompt
        )
        return str(text)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a prefix "
                "of its continuation; cannot tell response tokens apart"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def _segments_plain(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token or ""
    pieces: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
    for role, content in messages:
        header = PLAIN_TURN.format(role=role.capitalize(), content="")
        if role == "assistant":
            pieces += [(header, False), (content + eos, True), ("\n\n", False)]
        else:
            pieces.append(
                (PLAIN_TURN.format(role=role.capitalize(), content=content) + "\n\n", False)
            )
    return pieces


def encode(
    tokenizer: Any, messages: Sequence[Message], max_seq_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` outside responses), cut to ``max_seq_len``."""
    segments = (
        _segments_chat(tokenizer, messages)
        if getattr(tokenizer, "chat_template", None)
        else _segments_plain(tokenizer, messages)
    )
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_response else [IGNORE] * len(piece)
    return ids[:max_seq_len], labels[:max_seq_len]


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def make_batches(
    data: Conversations, tokenizer: Any, *, batch_size: int, max_seq_len: int
) -> list[Batch]:
    """Right-padded batches of ``max_seq_len`` tokens with response-only labels."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rows = []
    for conv in data.conversations:
        ids, labels = encode(tokenizer, conv, max_seq_len)
        if any(y != IGNORE for y in labels):
            rows.append((ids, labels))
    dropped = len(data) - len(rows)
    if not rows:
        raise DataError(
            f"{data.source}: no example keeps a response token within max_seq_len={max_seq_len}"
        )
    if dropped:
        log.warning(
            "%d of %d examples have no response token within %d tokens; left out",
            dropped,
            len(data),
            max_seq_len,
        )
    pad = pad_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = torch.full((len(chunk), max_seq_len), pad, dtype=torch.long)
        labels = torch.full((len(chunk), max_seq_len), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), max_seq_len), dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def dummy_batch(vocab_size: int, batch_size: int, seq_len: int, *, seed: int = 0) -> Batch:
    """Random full-length ids, every position a label: the largest loss graph of the shape."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
