"""Small waiting primitives the node's threads share."""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Iterator


class Wakeup:
    """Wakes the one thread that waits on it; a wake-up that finds it already set is merged.

    A bare lock used as a binary semaphore: half the cost of :class:`threading.Event` (no
    condition variable) on the path from a cache write to the sender thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already set: one wake-up covers both
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """Wait until set or ``timeout`` seconds have passed; True (and clear it) if it was set."""
        return self._lock.acquire(timeout=timeout)


@contextlib.contextmanager
def held(lock: threading.Lock, timeout: float) -> Iterator[bool]:
    """Hold ``lock`` for the block if it can be had within ``timeout``; says whether it was."""
    acquired = lock.acquire(timeout=timeout)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()


class Readable:
    """Waits until a file descriptor (a transport's receive-ready descriptor) is readable."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll: select.poll | None
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        else:  # Windows
            self._poll = None

    def wait(self, timeout_ms: int) -> bool:
        if self._poll is None:
            return bool(select.select([self.fd], [], [], timeout_ms / 1000)[0])
        # A closed socket reads as ready (POLLNVAL): the receive that follows raises Closed.
        return bool(self._poll.poll(timeout_ms))
