"""Content-addressed blob directory for adapter tensors.

A blob is stored under ``<root>/<sha256[:2]>/<sha256>``: written to a
temporary file in the same directory, fsynced, then renamed, so a reader sees
either the whole blob or none (a crash leaves only a temporary file, removed
on start). Database rows reference blobs by sha256; the same bytes are stored
once. Why a directory and not PostgreSQL ``bytea``: see docs/architecture.md
(measured with ``fedpilot bench blobs``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class BlobError(ValueError):
    """A blob's bytes do not match the digest they were declared with."""


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob("*/.tmp-*"):
            stale.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BlobError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        """Write ``chunks`` to a temporary file while hashing them (see :class:`BlobWriter`).
        Its fsync starts at once in the background, so a caller can verify the bytes
        meanwhile; :meth:`StagedBlob.commit` waits for it, then makes the blob visible."""
        writer = self.writer()
        try:
            for chunk in chunks:
                writer.put(chunk)
        except BaseException:
            writer.abandon()
            raise
        return writer.finish()

    def writer(self) -> BlobWriter:
        """A blob to be written chunk by chunk, then staged with :meth:`BlobWriter.finish`."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._tmpdir())
        return BlobWriter(self, fd, Path(tmp))

    def put(self, chunks: Iterable[bytes], expected_sha256: str | None = None) -> tuple[str, int]:
        """Store the bytes; returns (sha256, size). Idempotent for equal content."""
        staged = self.stage(chunks)
        if expected_sha256 is not None and staged.sha256 != expected_sha256:
            staged.discard()
            raise BlobError(f"content sha256 {staged.sha256} != declared {expected_sha256}")
        return staged.commit()

    @contextmanager
    def mapped(self, sha256: str) -> Iterator[mmap.mmap]:
        """The blob's bytes as a read-only memory map (zero-copy decoding)."""
        with _mapped(self.path(sha256)) as buf:
            yield buf

    def put_bytes(self, data: bytes | bytearray) -> tuple[str, int]:
        return self.put([data])

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def iter_chunks(self, sha256: str, chunk_bytes: int) -> Iterator[bytes]:
        with self.path(sha256).open("rb") as f:
            while chunk := f.read(chunk_bytes):
                yield chunk

    def sweep(self, referenced: set[str], *, older_than_s: float = 3600.0) -> int:
        """Delete blobs no row references (left by a crash between a blob and its row).

        Only blobs older than ``older_than_s`` go, so one being committed right now is
        never taken; at start, before anything writes, any age is safe. Returns how many.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob("??/" + "[0-9a-f]" * 64):
            if path.name in referenced:
                continue
            with contextlib.suppress(OSError):
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def _tmpdir(self) -> Path:
        tmp = self.root / "00"
        tmp.mkdir(exist_ok=True)
        return tmp


class BlobWriter:
    """A temporary file being written and hashed, chunk by chunk.

    The hashing and writing run on a thread of their own (:class:`_Writer`), so the
    receiving side goes back to receiving at once; at most :data:`WRITE_WINDOW` chunks
    wait between the two. Written bytes are flushed in the background every
    :data:`FLUSH_STEP`, so the fsync before the commit finds only the tail dirty. Both
    measured in docs/benchmarks.md ("Transfer"). An event loop calls :meth:`put_nowait`
    and waits elsewhere only when it returns False.
    """

    def __init__(self, store: BlobStore, fd: int, path: Path) -> None:
        self.store, self._fd, self.path = store, fd, path
        self._writer = _Writer(fd)

    def put(self, chunk: bytes) -> None:
        self._writer.put(chunk)

    def put_nowait(self, chunk: bytes) -> bool:
        """Queue ``chunk`` unless that would block (its window is full); whether queued."""
        return self._writer.put(chunk, block=False)

    def finish(self) -> StagedBlob:
        """Wait for the queued chunks; the staged blob (fsync started). On an error the
        temporary file is gone."""
        try:
            try:
                sha256, size = self._writer.finish()  # raises the writer's error, if any
            finally:
                os.close(self._fd)
        except BaseException:
            os.unlink(self.path)
            raise
        return StagedBlob(self.store, self.path, sha256, size)

    def abandon(self) -> None:
        """Stop, and remove the temporary file (the upload failed while receiving)."""
        with contextlib.suppress(BaseException):
            self.finish().discard()
        self.path.unlink(missing_ok=True)


class StagedBlob:
    """A fully written blob not yet visible under its digest (being fsynced)."""

    def __init__(self, store: BlobStore, path: Path, sha256: str, size: int) -> None:
        self.store, self.path, self.sha256, self.size = store, path, sha256, size
        self._synced: concurrent.futures.Future[None] = _SYNC.submit(_fsync_file, path)
        self._committed = False

    @contextmanager
    def mapped(self) -> Iterator[mmap.mmap]:
        with _mapped(self.path) as buf:
            yield buf

    def commit(self) -> tuple[str, int]:
        """Durable first (the file's fsync), then visible (rename, directory fsync).
        Idempotent: a retried database transaction may call it twice."""
        if self._committed:
            return self.sha256, self.size
        self._synced.result()
        target = self.store.path(self.sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(self.path, target)
        _fsync_dir(target.parent)
        self._committed = True
        return self.sha256, self.size

    @property
    def committed(self) -> bool:
        return self._committed

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._synced.result()
        self.path.unlink(missing_ok=True)


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


FLUSH_STEP = 32 << 20
"""A staged blob's written bytes are flushed in the background after each this many."""

INLINE_BYTES = 64 << 10
"""A first chunk up to this size is written by the caller even when it must not block
(an event loop): a small update costs no thread, a large one does not stall the loop."""

WRITE_WINDOW = 4
"""Chunks received but not yet written, per staged blob (4 MiB at the wire's 1 MiB)."""


class _Writer:
    """sha256 and the file write of one staged blob, on a thread of its own.

    hashlib and ``os.write`` release the GIL, so they run while the receiving thread
    parses the next messages. The thread starts with the second chunk: a blob of one
    chunk (most updates of a small adapter) is written in the caller's thread and
    costs no thread. After an error the thread keeps draining the queue without
    writing, so the receiving side never blocks on a full queue; the error is raised
    to it at its next :meth:`put` or at :meth:`finish`.
    """

    _END = object()

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.Queue[object] = queue.Queue(maxsize=WRITE_WINDOW)
        self._digest = hashlib.sha256()
        self._size = self._flushed = 0
        self._flushing: concurrent.futures.Future[None] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._chunks = 0

    def put(self, chunk: bytes, block: bool = True) -> bool:
        """Queue ``chunk`` (waiting for room, or not with ``block=False``); whether queued."""
        if self._error is not None:
            raise self._error
        if self._chunks == 0 and (block or len(chunk) <= INLINE_BYTES):
            self._chunks = 1
            self._write(chunk)
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blob-write", daemon=True)
            self._thread.start()
        try:
            self._queue.put(chunk, block=block)
        except queue.Full:
            return False
        self._chunks += 1
        return True

    def finish(self) -> tuple[str, int]:
        """Wait for the queued chunks; the sha256 and size of what was written."""
        if self._thread is not None:
            self._queue.put(self._END)
            self._thread.join()
        if self._flushing is not None:
            with contextlib.suppress(OSError):
                self._flushing.result()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest(), self._size

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not self._END:
            if self._error is None:
                try:
                    self._write(chunk)  # type: ignore[arg-type]
                except BaseException as e:  # handed to the receiving thread
                    self._error = e

    def _write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        view = memoryview(chunk)
        while view.nbytes:
            view = view[os.write(self._fd, view) :]
        self._size += len(chunk)
        done = self._flushing is None or self._flushing.done()
        if self._size - self._flushed >= FLUSH_STEP and done:
            self._flushing = _SYNC.submit(os.fdatasync, self._fd)
            self._flushed = self._size


_SYNC = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="blob-fsync")
"""fsync releases the GIL: it runs while the caller checks the staged bytes."""


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
