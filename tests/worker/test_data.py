import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fedpilot.v1 import coordinator_pb2, errors_pb2
from fedpilot.wire import WireError
from fedpilot.worker.data import (
    DataError,
    TextDataset,
    load_csv,
    load_data,
    partition,
    read_examples,
    synthetic_dataset,
)
from fedpilot.worker.service import WorkerService, WorkerSettings

JOB_LABELS = ["refund", "balance", "card"]
ROWS = [
    ("where is my money", "refund"),
    ("how much do I have", "balance"),
    ("my card is lost", "card"),
    ("give it back", "refund"),
]


def _csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jsonl(path: Path, objects) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


# -- formats ------------------------------------------------------------------------------


def test_csv_and_jsonl_give_the_same_dataset_with_the_jobs_ids(tmp_path) -> None:
    from_csv = load_data(_csv(tmp_path / "d.csv", ROWS), label_names=JOB_LABELS)
    from_jsonl = load_data(
        _jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in ROWS]),
        label_names=JOB_LABELS,
    )
    assert from_csv == from_jsonl
    assert from_csv.texts == tuple(t for t, _ in ROWS)
    assert from_csv.labels == (0, 1, 2, 0)  # the job's order, not the file's sorted names
    assert from_csv.label_names == tuple(JOB_LABELS)


def test_column_names_are_configurable(tmp_path) -> None:
    path = _csv(tmp_path / "d.csv", [(y, "x", t) for t, y in ROWS], header=("y", "id", "query"))
    data = load_data(path, text_column="query", label_column="y", label_names=JOB_LABELS)
    assert data.texts[0] == "where is my money" and data.labels == (0, 1, 2, 0)
    lines = _jsonl(tmp_path / "d.jsonl", [{"q": t, "intent": y, "n": 1} for t, y in ROWS])
    data = load_data(lines, text_column="q", label_names=JOB_LABELS)  # "intent" found by name
    assert data.labels == (0, 1, 2, 0)


def test_csv_with_a_byte_order_mark_and_blank_jsonl_lines(tmp_path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhello,card\n".encode())
    assert load_data(path, label_names=JOB_LABELS).labels == (2,)
    lines = tmp_path / "gaps.jsonl"
    lines.write_text('\n{"text": "a", "label": "card"}\n\n{"text": "b", "label": "refund"}\n')
    assert load_data(lines, label_names=JOB_LABELS).labels == (2, 0)


def test_a_dataset_saved_to_disk(tmp_path) -> None:
    import datasets  # a dependency of the worker extra: never skipped

    texts, names = [t for t, _ in ROWS], [y for _, y in ROWS]

    plain = datasets.Dataset.from_dict({"sentence": texts, "category": names})
    plain.save_to_disk(str(tmp_path / "plain"))
    data = load_data(tmp_path / "plain", label_names=JOB_LABELS)
    assert data.texts == tuple(texts) and data.labels == (0, 1, 2, 0)

    # A ClassLabel column is mapped by its names, whatever its own order of ids.
    own_order = ["card", "balance", "refund"]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=own_order)}
    )
    labelled = datasets.Dataset.from_dict(
        {"text": texts, "label": [own_order.index(y) for y in names]}, features=features
    )
    datasets.DatasetDict({"train": labelled, "test": labelled.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    data = load_data(tmp_path / "dict", label_names=JOB_LABELS)  # the "train" split
    assert data.labels == (0, 1, 2, 0)
    # Without job names the ClassLabel ids are the class ids.
    assert load_data(tmp_path / "dict", num_labels=3).labels == (2, 1, 0, 2)


def test_saved_dataset_problems_are_named(tmp_path) -> None:
    import datasets  # a dependency of the worker extra: never skipped

    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["card", "refund"]})
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\] and none named 'train'"):
        read_examples(tmp_path / "two")
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        read_examples(tmp_path / "not-a-dataset")
    ds.select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="the dataset has no rows"):
        read_examples(tmp_path / "empty")
    ds.rename_column("text", "body").save_to_disk(str(tmp_path / "body"))
    with pytest.raises(DataError, match="no text column"):
        read_examples(tmp_path / "body")


def test_datasets_is_optional(tmp_path, monkeypatch) -> None:
    # Importing the data module does not import datasets ...
    code = "import sys, fedpilot.worker.data; print('datasets' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
    # ... files read without it, and a dataset directory says what is missing.
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert len(read_examples(_csv(tmp_path / "d.csv", ROWS))) == 4
    (tmp_path / "saved").mkdir()
    with pytest.raises(DataError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        read_examples(tmp_path / "saved")


# -- the job's label list ---------------------------------------------------------------------


def test_label_ids_do_not_depend_on_which_labels_a_shard_holds(tmp_path) -> None:
    # Two workers with different subsets of the classes agree on every id.
    a = load_data(_csv(tmp_path / "a.csv", ROWS[1:3]), label_names=JOB_LABELS)
    b = load_data(_csv(tmp_path / "b.csv", [ROWS[2], ROWS[3]]), label_names=JOB_LABELS)
    assert a.labels == (1, 2) and b.labels == (2, 0)
    assert a.label_names == b.label_names == tuple(JOB_LABELS)


def test_a_job_without_label_names_takes_class_ids(tmp_path) -> None:
    path = _csv(tmp_path / "ids.csv", [("a", "2"), ("b", "0"), ("c", " 1 ")])
    assert load_data(path, num_labels=3).labels == (2, 0, 1)
    lines = _jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    assert load_data(lines, num_labels=3).labels == (2, 0)
    with pytest.raises(DataError, match=r"line 3: label 'card' is not a class id.*'labels'"):
        load_data(_csv(tmp_path / "n.csv", [("a", "1"), ("b", "card")]), num_labels=3)
    with pytest.raises(DataError, match=r"outside the job's ids 0\.\.2 \(line 2: '3'\)"):
        load_data(_csv(tmp_path / "big.csv", [("a", "3"), ("b", "1")]), num_labels=3)


def test_unknown_labels_fail_with_where_they_are(tmp_path) -> None:
    rows = [*ROWS, ("typo", "Refund"), ("other", "transfer")]
    path = _csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as info:
        load_data(path, label_names=JOB_LABELS)
    message = str(info.value)
    assert "2 of 6 examples have a label outside the job's 3 labels" in message
    assert "line 6: 'Refund'" in message and "line 7: 'transfer'" in message
    assert "--skip-unknown-labels" in message
    kept = load_data(path, label_names=JOB_LABELS, skip_unknown_labels=True)
    assert kept.labels == (0, 1, 2, 0)
    with pytest.raises(DataError, match="none of its 2 examples has one of the job's labels"):
        load_data(
            _csv(tmp_path / "x.csv", rows[4:]), label_names=JOB_LABELS, skip_unknown_labels=True
        )


def test_load_csv_keeps_its_behaviour(tmp_path) -> None:
    # Names sorted from the file when none are given; other labels dropped when they are.
    path = _csv(tmp_path / "d.csv", ROWS)
    data = load_csv(path)
    assert data.label_names == ("balance", "card", "refund") and data.labels == (2, 0, 1, 2)
    assert load_csv(path, label_names=["card"]).texts == ("my card is lost",)


# -- bad data ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", r"empty\.csv: the file is empty"),
        ("header.csv", "text,label\n", "a header but no rows"),
        ("cols.csv", "body,label\nhi,card\n", r"no text column: none of \['text'"),
        ("short.csv", "text,label\nhi,card\nlonely\n", "line 3 has 1 fields and no value"),
        ("empty.jsonl", "", "no JSON lines"),
        ("blank.jsonl", "\n\n", "no JSON lines"),
        (
            "bad.jsonl",
            '{"text": "a", "label": "card"}\n{"text": "b", "label": "card"\n',
            r"bad\.jsonl: line 2 is not valid JSON",
        ),
        ("list.jsonl", '["a", "card"]\n', "line 1 is a JSON list, not an object"),
        (
            "missing.jsonl",
            '{"text": "a", "label": "card"}\n{"text": "b"}\n',
            "line 2 has no 'label' field",
        ),
        ("nolabel.jsonl", '{"text": "a", "y": "card"}\n', "line 1: no label column"),
        ("num.jsonl", '{"text": 5, "label": "card"}\n', "'text' must be a string"),
        ("float.jsonl", '{"text": "a", "label": 1.5}\n', "label must be a string or an integer"),
        ("data.txt", "text,label\na,card\n", "unknown data format '.txt'"),
    ],
)
def test_bad_files_fail_with_a_clear_message(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_data(path, label_names=JOB_LABELS)


def test_more_bad_files(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "absent.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,card\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_examples(latin)
    with pytest.raises(DataError, match="no label column 'y'; columns are"):
        read_examples(_csv(tmp_path / "d.csv", ROWS), label_column="y")


def test_partitions_of_a_shared_file_are_disjoint_and_cover_it() -> None:
    data = synthetic_dataset(300, 5, seed=3)
    for alpha in (None, 0.5):
        parts = [partition(data, i, 4, alpha=alpha, seed=7) for i in range(4)]
        assert sum(len(p) for p in parts) == len(data)
        seen = sorted(t for p in parts for t in zip(p.texts, p.labels, strict=True))
        assert seen == sorted(zip(data.texts, data.labels, strict=True))
        again = partition(data, 2, 4, alpha=alpha, seed=7)
        assert again.texts == parts[2].texts  # every worker computes the same split


def test_bad_partitions_fail_before_training() -> None:
    data = synthetic_dataset(10, 2, seed=0)
    with pytest.raises(ValueError, match="index"):
        partition(data, 4, 4)
    with pytest.raises(DataError, match="empty"):
        partition(TextDataset((), (), ("a",)), 0, 1)
    with pytest.raises(DataError, match="partition 2/3 of 2 examples is empty"):
        partition(synthetic_dataset(2, 2, seed=0), 2, 3)


# -- the worker refuses bad data before profiling or training -------------------------------


class _NoCoordinator:
    """A client that fails the test if the worker talks to the coordinator."""

    def __getattr__(self, name: str):
        raise AssertionError(f"unexpected call {name}")


def _service(tmp_path, data: Path, **kw) -> WorkerService:
    settings = WorkerSettings(coordinator="unused", name="w", data=data, memory_budget=2**30, **kw)
    return WorkerService(settings, client=_NoCoordinator())  # type: ignore[arg-type]


def _task(kind: int, labels=JOB_LABELS) -> coordinator_pb2.Task:
    config = coordinator_pb2.JobConfig(
        model="/nonexistent", num_labels=len(labels) or 3, label_names=labels, batch_size=2
    )
    return coordinator_pb2.Task(task_id="t", job_id="j", round=1, kind=kind, config=config)


def test_worker_refuses_a_task_on_data_with_unknown_labels(tmp_path) -> None:
    service = _service(
        tmp_path, _csv(tmp_path / "d.csv", [*ROWS, ("x", "transfer")]), skip_unknown_labels=False
    )
    assert service.check_data() == 5  # readable: the worker starts
    for kind in (coordinator_pb2.TASK_KIND_PROFILE, coordinator_pb2.TASK_KIND_TRAIN):
        with pytest.raises(WireError) as info:
            (service._profile if kind == coordinator_pb2.TASK_KIND_PROFILE else service._train)(
                _task(kind)
            )
        assert info.value.reason == errors_pb2.ERROR_REASON_MALFORMED
        assert "line 6: 'transfer'" in info.value.message
    assert service._models == {}  # refused before any model was loaded
    skipping = _service(tmp_path, tmp_path / "d.csv", partition=(1, 2))  # the default skips
    data = skipping._dataset(_task(coordinator_pb2.TASK_KIND_TRAIN).config)
    assert 0 < len(data) < 4 and data.label_names == tuple(JOB_LABELS)


def test_worker_skips_unknown_labels_by_default_and_logs_the_count(tmp_path, caplog) -> None:
    service = _service(tmp_path, _csv(tmp_path / "d.csv", [*ROWS, ("x", "transfer")]))
    with caplog.at_level(logging.INFO, logger="fedpilot.worker.data"):
        data = service._dataset(_task(coordinator_pb2.TASK_KIND_TRAIN).config)
    assert data.labels == (0, 1, 2, 0)
    assert "1 of 5 examples have a label outside the job's 3 labels" in caplog.text
    assert "skipped them, 4 examples left" in caplog.text


def test_worker_uses_its_column_settings(tmp_path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"q": t, "y": y} for t, y in ROWS])
    service = _service(tmp_path, path, text_column="q", label_column="y")
    data = service._dataset(_task(coordinator_pb2.TASK_KIND_TRAIN).config)
    assert data.labels == (0, 1, 2, 0)
    with pytest.raises(DataError, match="no text column"):
        _service(tmp_path, path).check_data()


def _worker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", "worker", "--memory-budget", "1GiB", *args],
        capture_output=True,
        text=True,
        timeout=120,  # a worker that did not refuse would try to register until killed
        check=False,
    )


def test_worker_cli_refuses_bad_data_and_a_bad_partition_with_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "card"}\n{"text": "b",\n')
    result = _worker_cli("--data", str(bad), "--coordinator", "127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert "bad.jsonl: line 2 is not valid JSON" in result.stderr

    result = _worker_cli("--data", str(tmp_path / "x.csv"), "--partition", "3/2")
    assert result.returncode == 2 and "partition" in result.stderr
