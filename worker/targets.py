"""LoRA target modules in PEFT's terms, checked without torch (the coordinator uses it too).

A job lists ``target_modules`` as

* module names, matched as suffixes of module paths (``q_proj``, ``v_proj``,
  ``query``): PEFT's list semantics;
* one regular expression, the only entry, matched against the whole module path
  (``.*layers\\.[0-9]+\\.self_attn\\.(q|v)_proj``): PEFT's string semantics;
* ``all-linear``, the only entry: every linear layer except the output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ALL_LINEAR = "all-linear"
_PLAIN_NAME = re.compile(r"[\w.\-]+")


def peft_targets(targets: Iterable[str]) -> str | list[str]:
    """The target list as PEFT's ``target_modules``; ``ValueError`` names what is wrong."""
    names = list(targets)
    if not names:
        raise ValueError("target_modules must not be empty")
    if ALL_LINEAR in names:
        if len(names) > 1:
            raise ValueError(f"{ALL_LINEAR!r} must be the only target, got {names}")
        return ALL_LINEAR
    if len(names) == 1 and not _PLAIN_NAME.fullmatch(names[0]):
        if not names[0].startswith(".*"):
            raise ValueError(
                f"target pattern {names[0]!r} must start with '.*' (it is matched against "
                "whole module paths, whose first segments differ between model families)"
            )
        try:
            re.compile(names[0])
        except re.error as e:
            raise ValueError(f"target pattern {names[0]!r} is not a regular expression: {e}") from e
        return names[0]
    bad = [n for n in names if not _PLAIN_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"targets {bad} are not module names; a pattern must be the only target")
    return names
