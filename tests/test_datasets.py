"""The bundled datasets load through the worker's own reader, with their licences."""

from __future__ import annotations

import pytest

from fedpilot.bench.quality import load_split
from fedpilot.datasets import BUNDLED_SOTU, BUNDLED_SPAMASSASSIN
from fedpilot.worker.data import load_csv


def test_spamassassin_is_two_labelled_classes_with_its_licence() -> None:
    data = load_csv(BUNDLED_SPAMASSASSIN)
    assert sorted(data.label_names) == ["ham", "spam"]
    assert len(data.texts) == 5838
    assert all(text.strip() for text in data.texts)
    assert len(set(data.texts)) == len(data.texts)
    assert sum(data.labels) in (1739, 4099)  # spam's count, whichever id it got
    licence = (BUNDLED_SPAMASSASSIN.parent / "LICENSE").read_text()
    assert "PDDL" in licence and "CC0" in licence


def test_the_bench_splits_spamassassin_without_overlap() -> None:
    train_x, train_y, eval_x, eval_y, names = load_split(
        BUNDLED_SPAMASSASSIN, classes=2, per_class=400, eval_per_class=100, seed=3
    )
    assert names == ["ham", "spam"]
    assert len(train_x) == 800 and len(eval_x) == 200
    assert sorted(set(train_y)) == [0, 1] and eval_y.count(1) == 100
    assert not set(train_x) & set(eval_x)


ERAS = ["1790-1829", "1830-1869", "1870-1909", "1910-1949", "1950-1989", "1990-2029"]


def test_sotu_is_six_eras_of_2000_sentences_with_its_licence() -> None:
    data = load_csv(BUNDLED_SOTU)
    assert sorted(data.label_names) == ERAS
    assert len(data.texts) == 12000
    assert all(80 <= len(text) <= 200 and text == text.strip() for text in data.texts)
    assert len(set(data.texts)) == len(data.texts)
    assert sorted(data.labels.count(c) for c in range(6)) == [2000] * 6
    assert not any("[applause]" in text.lower() or "[p." in text for text in data.texts)
    licence = (BUNDLED_SOTU.parent / "LICENSE").read_text()
    assert "PDDL" in licence and "CC0" in licence


def test_the_bench_splits_sotu_without_overlap() -> None:
    train_x, train_y, eval_x, eval_y, names = load_split(
        BUNDLED_SOTU, classes=6, per_class=400, eval_per_class=100, seed=3
    )
    assert names == ERAS
    assert len(train_x) == 2400 and len(eval_x) == 600
    assert sorted(set(train_y)) == list(range(6)) and eval_y.count(5) == 100
    assert not set(train_x) & set(eval_x)


def test_the_bench_takes_chosen_labels_and_names_an_unknown_one() -> None:
    train_x, train_y, eval_x, _, names = load_split(
        BUNDLED_SOTU, 2, 50, 10, seed=0, labels=("1790-1829", "1990-2029")
    )
    assert names == ["1790-1829", "1990-2029"]
    assert len(train_x) == 100 and train_y.count(1) == 50 and len(eval_x) == 20
    with pytest.raises(ValueError, match="'2100-2139'"):
        load_split(BUNDLED_SOTU, 2, 50, 10, seed=0, labels=("1790-1829", "2100-2139"))
