import hashlib

import pytest

from fedpilot.coordinator.db.blobs import FLUSH_STEP, BlobError, BlobStore


def test_put_is_content_addressed_and_idempotent(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    sha, size = blobs.put([b"abc", b"def"])
    assert sha == hashlib.sha256(b"abcdef").hexdigest() and size == 6
    assert blobs.put_bytes(b"abcdef") == (sha, 6)
    assert blobs.read(sha) == b"abcdef"
    assert b"".join(blobs.iter_chunks(sha, 4)) == b"abcdef"


def test_declared_digest_mismatch_stores_nothing(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    with pytest.raises(BlobError, match="declared"):
        blobs.put([b"abc"], expected_sha256="0" * 64)
    assert not blobs.exists(hashlib.sha256(b"abc").hexdigest())
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_crash_mid_write_leaves_no_visible_blob(tmp_path) -> None:
    blobs = BlobStore(tmp_path)

    def chunks():
        yield b"partial"
        raise OSError("killed")

    with pytest.raises(OSError):
        blobs.put(chunks())
    assert not blobs.exists(hashlib.sha256(b"partial").hexdigest())
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_leftover_temporary_files_are_cleaned_on_open(tmp_path) -> None:
    (tmp_path / "00").mkdir()
    (tmp_path / "00" / ".tmp-abc").write_bytes(b"x")
    BlobStore(tmp_path)
    assert not (tmp_path / "00" / ".tmp-abc").exists()


def test_bad_digests_are_refused(tmp_path) -> None:
    with pytest.raises(BlobError):
        BlobStore(tmp_path).path("../../etc/passwd")


def test_sweep_removes_only_old_unreferenced_blobs(tmp_path) -> None:
    import os
    import time

    blobs = BlobStore(tmp_path)
    kept, orphan, young = (blobs.put_bytes(x)[0] for x in (b"kept", b"orphan", b"young"))
    old = time.time() - 7200
    for sha in (kept, orphan):
        os.utime(blobs.path(sha), (old, old))
    assert blobs.sweep({kept}, older_than_s=3600) == 1
    assert blobs.exists(kept) and blobs.exists(young) and not blobs.exists(orphan)


def test_a_staged_blob_commits_once_and_is_discarded_otherwise(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    staged = blobs.stage([b"payload"])
    assert not blobs.exists(staged.sha256) and not staged.committed
    assert staged.commit() == staged.commit()  # a retried transaction calls it again
    assert staged.committed and blobs.read(staged.sha256) == b"payload"
    other = blobs.stage([b"refused"])
    other.discard()
    assert not blobs.exists(other.sha256)
    assert not list((tmp_path / "00").glob(".tmp-*"))


@pytest.mark.parametrize("bad_at", [0, 1, 7])
def test_a_failing_write_reaches_the_caller_and_leaves_nothing(tmp_path, bad_at) -> None:
    """A write that fails, in the caller's thread (first chunk) or in the writing thread,
    is raised to the receiving side, which is never left blocked on a full window."""
    blobs = BlobStore(tmp_path)
    chunks: list = [b"b" * 10] * 50  # more than the window
    chunks[bad_at] = "not bytes"
    with pytest.raises(TypeError):
        blobs.put(chunks)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_blob_larger_than_the_flush_step_is_stored_whole(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    count = FLUSH_STEP // len(chunk) * 2 + 3
    sha, size = blobs.put([chunk] * count)
    assert size == count * len(chunk)
    assert sha == hashlib.sha256(chunk * count).hexdigest()
    assert blobs.read(sha) == chunk * count


def test_a_writer_that_must_not_block_refuses_a_chunk_when_its_window_is_full() -> None:
    """An event loop feeds a writer with ``put(block=False)``: with the writing thread
    stuck (here: a pipe nobody reads), at most the window's chunks are taken, the rest
    are refused at once instead of blocking the loop, and what was taken is written
    whole once the thread moves again."""
    import os
    import threading

    from coordinator.db.blobs import WRITE_WINDOW, _Writer

    read_end, write_end = os.pipe()
    writer = _Writer(write_end)
    chunk = b"x" * (1 << 18)  # larger than the pipe's buffer: the thread blocks writing
    assert writer.put(b"first", block=False)  # small first chunk: written by the caller
    answers = [writer.put(chunk, block=False) for _ in range(WRITE_WINDOW + 3)]
    taken = sum(answers)
    assert WRITE_WINDOW <= taken <= WRITE_WINDOW + 1 and not answers[-1]
    received = bytearray()

    def drain() -> None:
        while data := os.read(read_end, 1 << 16):
            received.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    sha, size = writer.finish()
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    expected = b"first" + chunk * taken
    assert size == len(expected) and bytes(received) == expected
    assert sha == hashlib.sha256(expected).hexdigest()


def test_an_abandoned_writer_leaves_no_file(tmp_path) -> None:
    blobs = BlobStore(tmp_path)
    writer = blobs.writer()
    writer.put_nowait(b"partial")
    writer.abandon()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
