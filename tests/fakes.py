"""Stand-ins for nng's objects and the clock, to drive a node's bookkeeping with no network."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_pipe_ids = itertools.count(1_000_000)  # far from the ids tests give by hand


class Clock:
    """A monotonic clock a test moves by hand (``clock.now += 1``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeDialer:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass(eq=False)  # compared, and hashed, by identity, as nng's pipes are
class FakePipe:
    id: int = field(default_factory=lambda: next(_pipe_ids))
    dialer: FakeDialer | None = None
    remote_address: str = "127.0.0.1:40000"
    closed: int = 0  # how many times it was hung up on

    def close(self) -> None:
        self.closed += 1


@dataclass
class FakeMessage:
    """A frame as a transport hands it to the node (``Received``)."""

    data: bytes
    source: FakePipe | None


@dataclass
class FakeNngMessage:
    """A frame as nng's socket hands it to the nng transport."""

    bytes: bytes
    pipe: FakePipe


@dataclass
class FakeSocket:
    """Keeps what is sent instead of sending it."""

    sent: list[bytes] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.sent.append(data)
