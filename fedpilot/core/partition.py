"""Splitting a labelled dataset across clients for experiments.

Both splits are deterministic functions of their inputs and ``seed``, and
every sample lands in exactly one client's part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the indices and deal them into ``num_clients`` near-equal parts."""
    _check(num_samples, num_clients)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives each client few classes (0.1 is strongly non-IID);
    large ``alpha`` approaches IID. Proportions are redrawn (deterministically)
    until every client holds at least ``min_size`` samples, as is usual, so no
    client is left with nothing to train on.
    """
    y = np.asarray(labels)
    _check(len(y), num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(y):
        raise ValueError(
            f"cannot give {num_clients} clients {min_size} samples each from {len(y)} samples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls))
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet({alpha}) split gave all {num_clients} clients >= {min_size} samples; "
        "lower min_size or raise alpha"
    )


def _check(num_samples: int, num_clients: int) -> None:
    if num_clients <= 0:
        raise ValueError(f"num_clients must be > 0, got {num_clients}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


def pathological_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes (the field's "pathological" split).

    Classes are dealt to clients from a shuffled, repeated class list so that every
    class has holders as evenly as possible; each class's samples are split evenly
    among its holders. Samples of a class nobody drew are left out.
    """
    y = np.asarray(labels)
    _check(len(y), num_clients)
    classes = np.unique(y)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(
            f"classes_per_client must be in 1..{len(classes)}, got {classes_per_client}"
        )
    rng = np.random.default_rng(seed)
    deck: list[int] = []
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        mine: list[int] = []
        while len(mine) < classes_per_client:
            if not deck:
                deck = [int(c) for c in rng.permutation(classes)]
            pick = next((c for c in deck if c not in mine), None)
            if pick is None:  # the deck's rest is already held: start a new deck
                deck = []
                continue
            deck.remove(pick)
            mine.append(pick)
        for c in mine:
            holders[c].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, who in holders.items():
        if not who:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        for client, chunk in zip(who, np.array_split(idx, len(who)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]
