"""Connections that cost memory and bring nothing (nng mesh only): junk, or silence."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from django_warpmesh.node.interfaces import NodePart
from django_warpmesh.node.transports.base import Received

if TYPE_CHECKING:
    from django_warpmesh.node.core import MeshNode

# Frames that fail verification on one connection before the node hangs up on it. Counted over
# the connection's life, not in a row: a stranger who listens to the mesh could otherwise keep
# its connection by slipping a recorded (valid) frame in between. A peer holding the key never
# sends one.
PIPE_STRIKES = 8
# Connections hung up on whose frames still queued are dropped unread, remembered at most.
DROPPED_PIPES_KEPT = 1024


class PipeGuard(NodePart):
    def __init__(self, node: MeshNode) -> None:
        super().__init__(node)
        # Frames rejected per connection (pipe id), and the connections hung up on for it.
        self._strikes: dict[int, int] = {}
        self._dropped: dict[int, None] = {}

    def _strike(self, pipe: Any) -> None:
        """A frame on ``pipe`` failed verification: after PIPE_STRIKES, hang up on it.

        nng queues what a connection sends before a single frame of it is verified (up to
        BUFFER_SIZE frames of MAX_FRAME_BYTES); a stranger's connection is closed as soon as it
        is seen to send junk, and what it had queued is then dropped unread.
        """
        pipe_id = pipe.id
        if pipe_id in self._dropped:
            return  # hung up on already: this frame was in the same batch
        strikes = self._strikes.get(pipe_id, 0) + 1
        # A peer's first frame on a new connection is its heartbeat, and verifies: one that
        # starts with junk is hung up on at once.
        if strikes < PIPE_STRIKES and pipe_id in self._node.links.pipe_owner:
            self._strikes[pipe_id] = strikes
            return
        self._strikes.pop(pipe_id, None)
        self._drop_pipe(pipe, f"{PIPE_STRIKES} frames that failed verification")

    def _drop_pipe(self, pipe: Any, why: str) -> None:
        """Hang up on ``pipe`` (on the thread that drains or ticks: never in an nng callback,
        which runs holding nng's locks) and drop unread what it still has queued."""
        dropped = self._dropped
        if pipe.id in dropped:
            return  # hung up on already; nng has not reported it gone yet
        dropped[pipe.id] = None
        if len(dropped) > DROPPED_PIPES_KEPT:
            del dropped[next(iter(dropped))]
        self.counters.pipes_dropped += 1
        address = "address unknown"
        with contextlib.suppress(Exception):
            address = str(pipe.remote_address)
        self.log.limited("drop_pipe", "mesh: hung up on a connection from %s: %s", address, why)
        with contextlib.suppress(Exception):  # already gone
            pipe.close()

    def _without_dropped(self, batch: list[Received]) -> list[Received]:
        """The frames of ``batch`` but those from a connection hung up on: dropped unread."""
        dropped = self._dropped
        kept = [message for message in batch if message.source.id not in dropped]
        skipped = len(batch) - len(kept)
        if skipped:
            self.counters.frames_received += skipped
            self.counters.frames_rejected += skipped
            self.counters.rejected_by_reason["dropped_connection"] += skipped
        return kept

    def _close_idle_pipes(self, now: float) -> None:
        """Hang up on connections that sent nothing verifiable for a liveness window after
        connecting.

        Each connection holds up to BUFFER_SIZE of our frames queued while it does not read: a
        stranger that connects and never reads (nor says who it is) would hold them, and get
        every frame we send, for as long as it stays connected. A peer says who it is at once
        (a heartbeat on every new connection, and every HEARTBEAT after).
        """
        links = self._node.links
        window = self.table.liveness
        with self.lock:
            idle = [
                pipe
                for pipe_id, pipe in links.pipes.items()
                if pipe_id not in links.pipe_owner
                and pipe_id not in links.self_pipes
                and now - links.connected_at.get(pipe_id, now) > window
            ]
            live = links.live_pipes
            for pipe_id in [p for p in self._strikes if p not in live]:
                del self._strikes[pipe_id]
        for pipe in idle:
            self._drop_pipe(pipe, f"nothing verifiable within {window:g} s of connecting")
        self._forget_gone_pipes()

    def _forget_gone_pipes(self) -> None:
        """pynng keeps a Pipe per id it sees; a frame taken after its connection went (one we
        hung up on, with frames still queued) adds the id back, never to be removed: drop
        those, or every junk connection leaves one behind."""
        sock = self._node.socket
        pipes = getattr(sock, "_pipes", None)
        notify = getattr(sock, "_pipe_notify_lock", None)
        if (
            not isinstance(pipes, dict)
            or notify is None
            or len(pipes) <= len(self._node.links.pipes)
        ):
            return
        # pynng's lock first, then ours: the order its callbacks (ours among them) take them.
        with notify, self.lock:
            live = self._node.links.live_pipes
            for pipe_id in [p for p in pipes if p not in live]:
                # One between nng's "adding" and "added" events is made again at "added".
                del pipes[pipe_id]
