"""File contents written by a small pool of threads while the unpacker reads on.

    pool = WriterPool(threads=2, max_queued_bytes=16 << 20)
    handle = pool.open_file(fd, finish=lambda fd: set_metadata(fd), entry="usr/bin/x")
    pool.write(handle, views, offset)     # memoryviews of the stream's reads, kept until written
    pool.seal(handle)                      # no more data: finish(fd) then close, after the last write
    pool.drain()                           # everything written and closed (raises the first error)
    pool.close()                           # stop the threads (closing what is left on an abort)

The unpacker stays single-threaded for everything that names a path (resolving, creating,
replacing, linking, removing): only writes to an already open fd, and the metadata calls on
that fd (fchown, fchmod, xattrs, futimens, which must follow the data: a write clears
security.capability and sets the mtime), run here. Pieces of one file are written with
pwritev at their offset, so any thread may take any piece. os.pwritev and the metadata calls
release the GIL; GNU tar does all of it in one thread. Queued bytes are bounded: the reader
waits once `max_queued_bytes` are in flight, so memory stays flat in the layer's size.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

IOV_MAX = 1024  # pwritev takes at most this many buffers per call (Linux UIO_MAXIOV)


class WriteFailed(Exception):
    """A write or metadata call failed on `entry`; the OSError is the __cause__."""

    def __init__(self, entry: str, error: OSError) -> None:
        super().__init__(entry, error)
        self.entry = entry
        self.error = error


@dataclass
class FileHandle:
    """An open file being written: how many pieces are queued, and whether more will come."""

    fd: int
    finish: Callable[[int], None]
    entry: str
    outstanding: int = 0
    sealed: bool = False


@dataclass
class _Piece:
    handle: FileHandle
    views: list[memoryview]
    offset: int
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(len(view) for view in self.views)


class WriterPool:
    """A few writer threads, a bounded queue of pieces, the first error kept."""

    def __init__(self, threads: int, max_queued_bytes: int) -> None:
        assert threads > 0, "no threads: write inline instead (pwrite_all)"
        self._cond = threading.Condition()
        self._queue: deque[_Piece | FileHandle] = deque()  # a bare handle: finish it
        self._queued_bytes = 0
        self._handles: dict[int, FileHandle] = {}  # open files, by id: closed by a writer or by close()
        self._error: WriteFailed | None = None
        self._stopping = False
        self._max_queued_bytes = max_queued_bytes
        self._threads = [threading.Thread(target=self._run, name=f"unpack-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    # -- the reader's side --------------------------------------------------------------

    def open_file(self, fd: int, finish: Callable[[int], None], entry: str) -> FileHandle:
        """Take ownership of `fd`: it is closed by the pool, after `finish(fd)`."""
        handle = FileHandle(fd, finish, entry)
        with self._cond:
            self._handles[id(handle)] = handle
        return handle

    def write(self, handle: FileHandle, views: list[memoryview], offset: int) -> None:
        """Queue `views` to be written at `offset`; waits while the queue is full."""
        piece = _Piece(handle, views, offset)
        with self._cond:
            while self._queued_bytes and self._queued_bytes + piece.size > self._max_queued_bytes:
                self._raise_error()
                self._cond.wait()
            self._raise_error()
            handle.outstanding += 1
            self._queued_bytes += piece.size
            self._queue.append(piece)
            self._cond.notify()

    def seal(self, handle: FileHandle) -> None:
        """No more data for `handle`: once its pieces are written, finish and close it."""
        with self._cond:
            handle.sealed = True
            if handle.outstanding == 0:
                self._queue.append(handle)
                self._cond.notify()

    def drain(self) -> None:
        """Wait until every file is written, finished and closed; raise the first failure."""
        with self._cond:
            while self._handles and self._error is None:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        """Stop the threads. Files still queued (after an error, or an abort) are closed unwritten."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._queue.clear()
        for handle in self._handles.values():
            os.close(handle.fd)
        self._handles.clear()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writers' side ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and (not self._queue or self._error is not None):
                    return
                item = self._queue.popleft()
            if isinstance(item, FileHandle):
                self._finish(item)
            else:
                self._write(item)

    def _write(self, piece: _Piece) -> None:
        handle = piece.handle
        try:
            if self._error is None:
                pwrite_all(handle.fd, piece.views, piece.offset)
        except OSError as exc:
            self._fail(handle, exc)
        with self._cond:
            self._queued_bytes -= piece.size
            handle.outstanding -= 1
            last = handle.sealed and handle.outstanding == 0
            self._cond.notify_all()
        if last:
            self._finish(handle)

    def _finish(self, handle: FileHandle) -> None:
        try:
            if self._error is None:
                handle.finish(handle.fd)
        except OSError as exc:
            self._fail(handle, exc)
        finally:
            os.close(handle.fd)
            with self._cond:
                del self._handles[id(handle)]
                self._cond.notify_all()

    def _fail(self, handle: FileHandle, exc: OSError) -> None:
        with self._cond:
            if self._error is None:
                failure = WriteFailed(handle.entry, exc)
                failure.__cause__ = exc
                self._error = failure
            self._cond.notify_all()


def pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of `views` at `offset` (pwritev may write less than asked)."""
    if len(views) == 1:  # the common case: a small file within one read
        view = views[0]
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError(0, "pwrite wrote nothing")
            view, offset = view[written:], offset + written
        return
    pending = [view for view in views if len(view)]
    while pending:
        batch = pending[:IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        if written <= 0:
            raise OSError(0, "pwritev wrote nothing")
        offset += written
        while written and pending:
            head = pending[0]
            if written >= len(head):
                written -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0
