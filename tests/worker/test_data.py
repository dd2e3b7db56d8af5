import subprocess
import sys

import pytest

from fedpilot.worker.data import TextDataset, partition, synthetic_dataset


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
    with pytest.raises(ValueError, match="empty"):
        partition(TextDataset((), (), ("a",)), 0, 1)


def test_worker_cli_refuses_a_bad_partition_with_exit_2(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedpilot.cli",
            "worker",
            "--data",
            str(tmp_path / "x.csv"),
            "--memory-budget",
            "1GiB",
            "--partition",
            "3/2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "partition" in result.stderr
