"""A descriptor that a thread makes readable to wake another one out of ``poll``.

Behind every descriptor a transport makes readable on purpose: a broker's inbox (the node's
receiver polls it as it polls nng's), and the wake-ups of the PostgreSQL transport's threads.
"""

from __future__ import annotations

import contextlib
import os
import threading


class WakePipe:
    """A pipe, readable from the first :meth:`wake` until :meth:`clear`.

    Written once until cleared, so a run of wake-ups costs one write, not one each. Thread-safe.
    Once closed, waking and clearing do nothing: the descriptor numbers may by then belong to
    someone else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._pending = False
        self._closed = False

    @property
    def fd(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        with self._lock:
            if self._pending or self._closed:
                return
            self._pending = True
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        with self._lock:
            # Nothing was written since the last clear: no read (a system call) to make.
            if not self._pending or self._closed:
                return
            self._pending = False
            with contextlib.suppress(OSError):
                os.read(self._read_fd, 4096)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
