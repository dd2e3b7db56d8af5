"""Checks of every field a worker sends, at the RPC boundary, before anything is stored.

Protobuf hands the coordinator uint64s up to 2^64 - 1, doubles that may be NaN or
infinite and strings of any length holding NUL; PostgreSQL refuses all three
(BIGINT ends at 2^63 - 1, JSON has no NaN, text has no NUL). Refusing them here
with a named field keeps a bad message from failing later, somewhere shared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedpilot.v1 import errors_pb2
from fedpilot.wire import WireError

MAX_BYTES = 1 << 50
"""Largest byte count taken from a worker (1 PiB): far above any device, far below 2^63."""
MAX_SAMPLES = 1 << 40
MAX_SECONDS = 10.0 * 365 * 24 * 3600
MAX_LOSS = 1e12
MAX_SCORE = 1e30
ID_CHARS = 36
"""Ids are UUIDs (36 characters)."""


def malformed(message: str, field: str) -> WireError:
    return WireError(errors_pb2.ERROR_REASON_MALFORMED, message, field)


def text(value: str, field: str, *, max_chars: int, required: bool = False) -> str:
    """A string without NUL and at most ``max_chars`` long (and not empty if ``required``)."""
    if required and not value:
        raise malformed(f"{field} must not be empty", field)
    if len(value) > max_chars:
        raise malformed(f"{field} has {len(value)} characters; at most {max_chars}", field)
    if "\x00" in value:
        raise malformed(f"{field} contains a NUL character", field)
    return value


def ident(value: str, field: str, *, required: bool = True) -> str:
    """An id field: empty only where optional, at most 36 characters, no NUL."""
    return text(value, field, max_chars=ID_CHARS, required=required)


def count(value: int, field: str, *, maximum: int = MAX_BYTES, minimum: int = 0) -> int:
    if not minimum <= value <= maximum:
        raise malformed(f"{field} = {value} is outside [{minimum}, {maximum}]", field)
    return value


def finite(value: float, field: str, *, low: float, high: float) -> float:
    if not math.isfinite(value):
        raise WireError(errors_pb2.ERROR_REASON_NON_FINITE, f"{field} is {value}", field)
    if not low <= value <= high:
        raise malformed(f"{field} = {value:g} is outside [{low:g}, {high:g}]", field)
    return value


def string_map(
    values: Mapping[str, str], field: str, *, max_items: int, max_chars: int
) -> dict[str, str]:
    if len(values) > max_items:
        raise malformed(f"{field} has {len(values)} entries; at most {max_items}", field)
    out = {}
    for key, value in values.items():
        text(key, f"{field} key", max_chars=max_chars, required=True)
        text(value, f"{field}[{key}]", max_chars=max_chars)
        out[key] = value
    return out


def score_map(
    values: Mapping[str, float], field: str, *, max_items: int, max_chars: int = 300
) -> dict[str, float]:
    if len(values) > max_items:
        raise malformed(f"{field} has {len(values)} entries; at most {max_items}", field)
    out = {}
    for key, value in values.items():
        text(key, f"{field} key", max_chars=max_chars, required=True)
        out[key] = finite(value, f"{field}[{key}]", low=-MAX_SCORE, high=MAX_SCORE)
    return out
