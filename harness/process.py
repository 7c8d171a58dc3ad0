"""The parent's side of a Python process driven by JSON lines on its stdin and stdout.

The child (:func:`harness.serve.serve`) says hello in one line, then answers each request line
with one reply line, ``{"ok": result}`` or ``{"error": "..."}``. Every read here has a deadline:
a child that does not answer in time is killed and :class:`ProcessError` raised, so that neither a
test nor a benchmark waits forever on a hung process. :meth:`JsonLinesProcess.close` always reaps
it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from harness import ROOT

# Long enough for any call a test or benchmark makes on a loaded machine (pytest's own timeout),
# short enough that a hung child ends the run rather than stalling it.
DEFAULT_TIMEOUT = 120.0


class ProcessError(RuntimeError):
    """The process answered with an error, exited, or did not answer in time (and was killed)."""


class JsonLinesProcess:
    """``python -m <module>`` started from :data:`harness.ROOT`, with exactly ``env`` as its
    environment, driven by JSON lines. ``prefix``: a command that runs it, such as ``["ip",
    "netns", "exec", NAME]`` (:mod:`harness.netns`); it must exec the process, not fork it, so
    that ``pid`` is the Python process's own.

    Its stderr goes to a temporary file, not a pipe: a pipe nobody reads fills up and blocks the
    child; the file is read for error messages (:meth:`stderr_tail`).

    :meth:`ask` (send, then wait for the answer) is safe from several threads. :meth:`send` and
    :meth:`receive` are the two halves, for running a call in several processes at once, or for
    a request whose answer comes later or not at all.
    """

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        *,
        name: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        prefix: Sequence[str] = (),
    ) -> None:
        self.timeout = timeout  # for every read that is not given a timeout of its own
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self._buffer = b""  # what was read past the last complete line
        self._talking = threading.Lock()  # one request and its answer at a time in ask()
        self._exiting = False
        self.hello: dict[str, Any] | None = None  # the child's first line, once read
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.pid = self.proc.pid
        self.name = name or f"{module} (pid {self.pid})"

    def __enter__(self) -> JsonLinesProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- talking ----------------------------------------------------------------------------

    def wait_hello(self, timeout: float | None = None) -> dict[str, Any]:
        """The child's hello line (read now if it has not been): it has started."""
        if self.hello is None:
            self.hello = self._read_line(self._deadline(timeout))
        return self.hello

    def send(self, request: dict[str, Any]) -> None:
        """Write one request line; its answer is read by :meth:`receive`."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # ValueError: our end already closed
            raise ProcessError(f"{self.name}: cannot send ({exc}): {self.stderr_tail()}") from None

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next reply line as it came (``{"ok": ...}`` or ``{"error": ...}``), within
        ``timeout`` (default: the process's); the hello first if it was not read yet."""
        deadline = self._deadline(timeout)
        if self.hello is None:
            self.hello = self._read_line(deadline)
        return self._read_line(deadline)

    def answer(self, timeout: float | None = None) -> Any:
        """The result in the next reply line; an error reply raises :class:`ProcessError`."""
        reply = self.receive(timeout)
        if "error" in reply:
            raise ProcessError(f"{self.name}: {reply['error']}")
        return reply["ok"]

    def ask(self, request: dict[str, Any], timeout: float | None = None) -> Any:
        """Send ``request`` and return its result (:meth:`answer`)."""
        with self._talking:  # a caller may drive one process from two threads
            self.send(request)
            return self.answer(timeout)

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _read_line(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            self._buffer += self._read_some(deadline)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    def _read_some(self, deadline: float) -> bytes:
        """What the child wrote next (at least a byte); it exiting or its deadline passing raises.

        select() and os.read() rather than readline(): a blocking readline could not be
        abandoned at the deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise ProcessError(f"{self.name}: no answer in time; killed. {self.stderr_tail()}")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ProcessError(f"{self.name} exited: {self.stderr_tail()}")
                return chunk

    def wait_eof(self, deadline: float) -> bool:
        """Read (and drop) what the child still writes until its stdout closes (it has exited, or
        is about to), or until ``deadline``; whether it closed."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], remaining)[0] and not os.read(fd, 65536):
                return True
        return False

    # -- its stderr -------------------------------------------------------------------------

    def stderr_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters the process wrote to stderr ("" once closed)."""
        if self._stderr.closed:
            return ""
        # pread, at an offset: the file's own offset is shared with the child, which writes at
        # it; moving it (seek, read) would make the child overwrite what it wrote.
        fd = self._stderr.fileno()
        size = os.fstat(fd).st_size
        start = max(0, size - 4 * limit)  # at most 4 bytes a character
        text = os.pread(fd, size - start, start).decode(errors="replace")
        return text[-limit:]

    # -- ending -----------------------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``. SIGKILL and SIGTERM are waited for (10 s), so the process is gone when
        this returns; a SIGTERM it outlives raises :class:`subprocess.TimeoutExpired`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            self.proc.wait(10)
        elif sig == signal.SIGKILL:
            # Nothing more can be done about a process SIGKILL has not ended yet (in the kernel,
            # uninterruptible): not worth an exception on a path that is giving up on it.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def ask_exit(self) -> None:
        """Send the ``exit`` call without waiting for it (:meth:`close` waits). Not before the
        hello: a process still starting up is killed instead."""
        if self._exiting or self.hello is None or self.proc.poll() is not None:
            return
        self._exiting = True
        with contextlib.suppress(ProcessError):
            self.send({"call": "exit"})

    def close(self, timeout: float = 10.0) -> None:
        """Ask the process to exit and wait ``timeout`` for it; kill it if it has not. Always
        reaped, its pipes and stderr file closed; closing again does nothing."""
        try:
            self.ask_exit()
            if self._exiting:
                self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            self._stderr.close()


def run_django(
    *args: str, env: Mapping[str, str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m django ARGS`` (a management command: ``migrate``, ``shell -c``, ...) from
    :data:`harness.ROOT`, with exactly ``env`` as its environment (which names the settings),
    run to its end, its output captured as text. ``check``: a nonzero exit status raises
    :class:`ProcessError` with the end of its stderr (captured, it would be lost otherwise)."""
    done = subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        command = " ".join(["python -m django", *args])
        raise ProcessError(f"{command}: exit status {done.returncode}: {done.stderr[-2000:]}")
    return done
