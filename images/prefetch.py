"""Background downloads of a job's later blobs while its earlier layers unpack.

    prefetch.start(job_id, url, fetch)     # fetch(should_stop) runs on the one worker thread
    layers = prefetch.take(job_id, url, pause)  # blocks (in slices) until it is done

One worker thread per process: blobs arrive in the order they were asked for, and the
network is never split between more downloads than the unpack in front of them needs.
The worker touches no database and no device: what it fetched is recorded by the job's own
thread when it takes it. A failed fetch is re-raised to the job by `take` (and forgotten,
so the step's retry fetches again); `cancel` (the job aborted) stops what is queued and
the download running, at its next chunk, keeping the partial file for a later resume.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from support.errors import ManagerError

Fetch = Callable[[Callable[[], bool]], Any]  # fetch(should_stop) -> result
WAIT_SLICE_SECONDS = 0.25


class PrefetchCancelled(ManagerError):
    """The job that asked for the download is gone (aborted or stopping)."""


class Prefetcher:
    """The process's background downloads, keyed by (job id, object url)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[tuple[int, str], Future[Any]] = {}
        self._cancelled: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, job_id: int, url: str, fetch: Fetch) -> None:
        """Queue `fetch` for the job's object `url` (a second start while it runs is ignored)."""
        with self._lock:
            running = self._futures.get((job_id, url))
            if running is not None and not running.done():
                return
            cancelled = self._cancelled.setdefault(job_id, threading.Event())
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

            def run() -> Any:
                if cancelled.is_set():
                    raise PrefetchCancelled(f"download of {url} cancelled")
                return fetch(cancelled.is_set)

            self._futures[(job_id, url)] = self._pool.submit(run)

    def take(self, job_id: int, url: str, check_interrupt: Callable[[], None]) -> Any | None:
        """The result of the job's download of `url` once done (its error re-raised), or None
        when none was started in this process (a resumed job fetches it itself). Waits on
        the download itself, in slices; `check_interrupt` raises when the job must stop
        waiting (abort, shutdown)."""
        with self._lock:
            future = self._futures.get((job_id, url))
        if future is None:
            return None
        while not future.done():
            check_interrupt()
            wait([future], timeout=WAIT_SLICE_SECONDS)
        with self._lock:
            self._futures.pop((job_id, url), None)
        try:
            return future.result()
        except PrefetchCancelled:
            return None  # stopped by a shutdown that did not stop this job: it fetches itself

    def cancel(self, job_id: int) -> None:
        """Stop the job's queued and running downloads; forget them."""
        with self._lock:
            self._cancelled.setdefault(job_id, threading.Event()).set()
            for key in [key for key in self._futures if key[0] == job_id]:
                self._futures.pop(key).cancel()
            self._cancelled.pop(job_id, None)

    def shutdown(self) -> None:
        """Cancel everything and let the worker finish (the process is stopping)."""
        with self._lock:
            for event in self._cancelled.values():
                event.set()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
