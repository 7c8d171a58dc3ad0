"""What every broker transport is built from (transports/base.py, transports/wakeup.py)."""

from __future__ import annotations

import select

from django_warpmesh.node.transports.base import (
    FrameInbox,
    error_line,
    retry_delay,
)
from django_warpmesh.node.transports.wakeup import WakePipe


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def test_retry_delay_doubles_up_to_its_cap_jittered() -> None:
    for failures, full in ((1, 0.1), (2, 0.2), (5, 1.6), (6, 3.2), (7, 5.0), (50, 5.0)):
        for _ in range(50):
            assert full / 2 <= retry_delay(failures, 0.1, 5.0) <= full


def test_retry_delay_never_overflows_however_long_the_server_is_down() -> None:
    # 2.0 ** 1024 overflows a float: a bare exponent raised after 1025 failed attempts.
    assert 0.5 <= retry_delay(10**6, 0.05, 1.0) <= 1.0


def test_error_line_is_one_line_without_a_password() -> None:
    assert error_line(OSError("failed\n\tIs the server running?")) == "failed"
    assert error_line(ValueError("nats://alice:s3cret@host:4222 refused")) == (
        "nats://***@host:4222 refused"
    )
    assert error_line(TimeoutError()) == "TimeoutError"


def test_a_wake_pipe_is_readable_from_a_wake_until_cleared() -> None:
    pipe = WakePipe()
    try:
        assert not readable(pipe.fd)
        pipe.wake()
        pipe.wake()
        assert readable(pipe.fd)
        pipe.clear()
        assert not readable(pipe.fd)
        pipe.clear()
    finally:
        pipe.close()
    pipe.wake()  # closed: nothing happens
    pipe.clear()
    pipe.close()


def test_the_inbox_is_readable_exactly_while_frames_wait() -> None:
    inbox = FrameInbox(capacity=2)
    try:
        assert not readable(inbox.fd)
        assert inbox.put(b"a")
        assert inbox.put(b"b")
        assert not inbox.put(b"c")  # past capacity: dropped, counted
        assert inbox.dropped == 1
        assert readable(inbox.fd)
        assert inbox.take(1) == [b"a"]
        assert readable(inbox.fd)
        assert inbox.take(10) == [b"b"]
        assert not readable(inbox.fd)
    finally:
        inbox.close()
    assert not inbox.put(b"closed")
    assert inbox.take(10) == []
