"""The prefetcher's contract (pure logic: threads and events, no network): results in the
order asked, errors handed to the job once, cancel reaching a running download, and a
wait that gives way to the job's interrupt check. The real overlap runs through
process-image in tests/test_streaming_checks.py and tests/test_process_image.py."""

from __future__ import annotations

import threading

import pytest

from images.prefetch import PrefetchCancelled, Prefetcher
from support.errors import TransientError


def test_results_come_back_and_errors_are_raised_once() -> None:
    prefetch = Prefetcher()
    prefetch.start(1, "a", lambda stop: "layer a")
    prefetch.start(1, "b", lambda stop: (_ for _ in ()).throw(TransientError("connection reset")))
    try:
        assert prefetch.take(1, "a", lambda: None) == "layer a"
        with pytest.raises(TransientError, match="connection reset"):
            prefetch.take(1, "b", lambda: None)
        assert prefetch.take(1, "b", lambda: None) is None  # forgotten: the step's retry fetches it itself
        assert prefetch.take(2, "a", lambda: None) is None  # another job's: never started
    finally:
        prefetch.shutdown()


def test_cancel_stops_a_running_fetch_at_its_next_check() -> None:
    prefetch = Prefetcher()
    running, stopped = threading.Event(), threading.Event()

    def fetch(should_stop):  # type: ignore[no-untyped-def]
        running.set()
        while not should_stop():
            running.wait(0.01)
        stopped.set()
        raise PrefetchCancelled("stopped")

    prefetch.start(7, "big", fetch)
    prefetch.start(7, "queued", lambda stop: "never run")
    assert running.wait(10)
    prefetch.cancel(7)
    assert stopped.wait(10)
    assert prefetch.take(7, "queued", lambda: None) is None
    prefetch.shutdown()


def test_a_wait_gives_way_to_the_jobs_interrupt() -> None:
    prefetch = Prefetcher()
    release = threading.Event()
    prefetch.start(3, "slow", lambda stop: release.wait(30) and "done")
    checks = []

    def interrupt() -> None:
        checks.append(1)
        if len(checks) == 3:
            raise KeyboardInterrupt("abort requested")

    with pytest.raises(KeyboardInterrupt):
        prefetch.take(3, "slow", interrupt)
    assert len(checks) == 3
    release.set()
    assert prefetch.take(3, "slow", lambda: None) == "done"
    prefetch.shutdown()
