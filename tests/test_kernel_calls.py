"""devices.loop.in_kernel: a kernel call on a kept thread with a deadline (pure logic: the
calls here are Python functions, so no root and no loop device is needed)."""

from __future__ import annotations

import threading

import pytest

from devices import loop
from support.proc import CommandTimeout


def test_a_call_gives_its_value_or_its_error_to_the_caller() -> None:
    assert loop.in_kernel(lambda: 42, 5, "answer") == 42

    def refuse() -> None:
        raise OSError(16, "Device or resource busy")

    with pytest.raises(OSError, match="busy"):
        loop.in_kernel(refuse, 5, "refuse")


def test_calls_one_after_another_reuse_one_thread() -> None:
    first = loop.in_kernel(threading.get_ident, 5, "who")
    assert first != threading.get_ident()  # not the caller's own thread: the deadline needs another
    assert loop.in_kernel(threading.get_ident, 5, "who") == first


def test_a_call_past_its_deadline_is_a_timeout_and_its_thread_is_never_reused() -> None:
    release = threading.Event()
    stuck_on: list[int] = []

    def hang() -> None:
        stuck_on.append(threading.get_ident())
        release.wait(30)

    try:
        with pytest.raises(CommandTimeout, match="stuck ioctl"):
            loop.in_kernel(hang, 0.2, "stuck ioctl")
        after = {loop.in_kernel(threading.get_ident, 5, "who") for _ in range(3)}
        assert stuck_on and stuck_on[0] not in after  # the stuck thread is left to its call
    finally:
        release.set()
