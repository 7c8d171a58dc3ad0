"""This process's node: which kind it is, when it starts, and what becomes of it at a fork and at
exit.

The node starts on the first mutation of a cache (``get_node()``), built by the factory the
Django side installed (:func:`set_node_factory`), so each pre-fork worker gets its own. In a
process forked from one whose node had opened the nng socket (which nng cannot survive), the
node is relayed through the parent's (:mod:`django_warpmesh.node.relay`), or else caches alone.

The module-level state here is rebound at runtime (``_current``, ``drain_before_read``,
``_nng_opened_in``, ``_relay_channel``): read it through this module, never through a copy
imported from it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pynng

from django_warpmesh.node import stats
from django_warpmesh.node.core import MeshNode
from django_warpmesh.node.interfaces import Store
from django_warpmesh.node.relay import RelayedNode
from django_warpmesh.protocol import OpCode

logger = logging.getLogger("django_warpmesh")

# Entry lifetime cap of a process whose mesh could not even be configured.
FALLBACK_TIMEOUT = 5.0


class NullNode:
    """The node of a process that caches alone: mesh disabled, unavailable, or unusable."""

    enabled = False
    ready = True
    max_timeout: float | None = None

    def __init__(self, reason: str, max_timeout: float | None = None) -> None:
        self.reason = reason
        self.max_timeout = max_timeout
        self.pid = os.getpid()

    def register_store(self, location: str, store: Store) -> None:
        pass

    def store_locations(self) -> list[str]:
        return []

    def publish(self, location: str, code: OpCode, arg: Any) -> None:
        pass

    def deliver(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return stats.alone_snapshot(self.reason, degraded=self.max_timeout is not None)

    def stop(self) -> None:
        pass


AnyNode = MeshNode | NullNode | RelayedNode

_current: AnyNode | None = None
_current_lock = threading.Lock()
# The pid of the process that opened an nng socket. nng cannot be used again in a process
# forked from it (it aborts), so a forked child must not even try.
_nng_opened_in: int | None = None
_node_factory: Callable[[], MeshNode | NullNode] | None = None
_existing_stores: Callable[[], Mapping[str, Store]] = dict
_degraded_timeout: Callable[[], float | None] = lambda: FALLBACK_TIMEOUT  # noqa: E731
# Made before a fork of a process whose node runs: the parent's end and the child's end.
_relay_pair: tuple[socket.socket, socket.socket] | None = None
# In a child forked after the socket opened: its end of that pair, its parent's pid, and the
# parent's state at the fork (ready, degraded cap), which the child starts from.
_relay_channel: tuple[socket.socket, int, bool, float | None] | None = None


def set_node_factory(
    factory: Callable[[], MeshNode | NullNode],
    stores: Callable[[], Mapping[str, Store]],
    degraded_timeout: Callable[[], float | None],
) -> None:
    """Installed by the cache layer, which knows the settings the node is built from: the
    factory, the stores that exist already (each node, whatever its kind, is given them), and
    ``DEGRADED_TIMEOUT`` (the entry lifetime cap of a forked child that cannot have a node)."""
    global _node_factory, _existing_stores, _degraded_timeout
    _node_factory = factory
    _existing_stores = stores
    _degraded_timeout = degraded_timeout


def current_node() -> AnyNode | None:
    """This process's node if one was started (or refused), without starting one."""
    return _current


def get_node() -> AnyNode:
    node = _current
    if node is not None:
        return node
    return _start_node()


def _no_drain() -> None:
    pass


# Called by every cache read: the running node's drain() (see MeshNode.drain), or nothing.
drain_before_read: Callable[[], None] = _no_drain


def _start_node() -> AnyNode:
    global _current, drain_before_read
    with _current_lock:
        if _current is None:
            if _node_factory is None:
                # No MeshCache has been imported yet, so there is nothing to keep coherent; do
                # not remember this answer, or the first real cache use would never start it.
                return NullNode("no MeshCache configured in this process yet")
            _current = _make_node(_node_factory)
            if isinstance(_current, MeshNode) and _current.config.drain_on_read:
                drain_before_read = _current.drain
        return _current


def _make_node(factory: Callable[[], MeshNode | NullNode]) -> AnyNode:
    """This process's node, given the stores that exist, started (under ``_current_lock``)."""
    global _nng_opened_in, _relay_channel
    node: AnyNode
    if _nng_opened_in is not None and _nng_opened_in != os.getpid():
        cap = _degraded_timeout()
        if _relay_channel is not None:
            sock, parent_pid, ready, max_timeout = _relay_channel
            _relay_channel = None
            logger.warning(
                "mesh: this process was forked from pid %s after that process had opened the "
                "mesh socket (nng cannot be used after fork): its invalidations are relayed "
                "through that process's node. Use the cache only after the fork (gunicorn "
                "without --preload, uWSGI lazy-apps) to give it a node of its own.",
                parent_pid,
            )
            node = RelayedNode(
                sock, parent_pid, cap or FALLBACK_TIMEOUT, ready=ready, max_timeout=max_timeout
            )
        else:
            logger.error(
                "mesh: this process was forked from one (pid %s) that had already opened the "
                "mesh socket, and nng cannot be used after fork; caching locally only, with "
                "entries capped at DEGRADED_TIMEOUT, and writes here reach no other instance. "
                "Do not use the cache before the fork (e.g. in gunicorn --preload at import "
                "time).",
                _nng_opened_in,
            )
            node = NullNode("forked after the mesh socket was opened", cap)
        _register_existing_stores(node)
        return node
    try:
        node = factory()
    except Exception as exc:
        # Invalid settings (the settings check names the key) must not fail requests; but
        # without a mesh, peers' writes cannot reach us: cap what we cache.
        logger.error(
            "mesh: cannot build the mesh node (%s); caching locally only, entries capped at %s s",
            exc,
            FALLBACK_TIMEOUT,
        )
        node = NullNode(f"cannot build the mesh node: {exc}", FALLBACK_TIMEOUT)
    _register_existing_stores(node)
    if isinstance(node, MeshNode):
        _nng_opened_in = os.getpid()
        try:
            node.start()
        except Exception as exc:
            cap = node.config.degraded_timeout
            logger.error(
                "mesh: could not start (%s); caching locally only, entries capped at %s s",
                exc,
                cap,
            )
            with contextlib.suppress(Exception):
                node.stop(timeout=0)
            node = NullNode(f"could not start: {exc}", cap)
    return node


def _register_existing_stores(node: AnyNode) -> None:
    for name, store in _existing_stores().items():
        node.register_store(name, store)


def stop_node() -> None:
    """Stop this process's node (atexit, tests). The next cache use starts a new one."""
    global _current, drain_before_read
    with _current_lock:
        node, _current = _current, None
        drain_before_read = _no_drain
    if node is not None and node.pid == os.getpid():
        node.stop()


def _before_fork() -> None:
    global _relay_pair
    node = _current
    if isinstance(node, MeshNode) and node.pid == os.getpid() and node.running:
        try:
            _relay_pair = socket.socketpair()
        except OSError:
            _relay_pair = None  # out of descriptors: the child caches alone, as it says


def _after_fork_in_parent() -> None:
    global _relay_pair
    pair, _relay_pair = _relay_pair, None
    if pair is None:
        return
    parent_end, child_end = pair
    child_end.close()
    node = _current
    if isinstance(node, MeshNode):
        node.adopt_child(parent_end)
    else:
        parent_end.close()


def _after_fork_in_child() -> None:
    global _current, _current_lock, _relay_pair, _relay_channel, drain_before_read
    drain_before_read = _no_drain
    if _nng_opened_in is not None:
        # pynng's atexit handler shuts nng down; in a child of a process that used nng it
        # waits forever for threads that were not forked, and the child never exits.
        with contextlib.suppress(AttributeError):
            atexit.unregister(pynng.nng._pynng_atexit)
        # Any nng call in this process aborts it ("nng is not fork-reentrant safe"), and a
        # pynng socket or context calls nng_close when it is collected, closed or not: one of
        # the parent's, collected here (a reference cycle, at exit), would kill the child.
        for kind in (pynng.Socket, pynng.Context):
            kind.__del__ = _forgotten
    # Descriptors of the parent's relays are not ours: a copy held here would keep a sibling
    # (or our own parent) from seeing the other end close.
    inherited = _current.relayed_sockets() if isinstance(_current, MeshNode) else []
    if isinstance(_current, RelayedNode):
        inherited.append(_current.socket)
    if _relay_channel is not None:
        inherited.append(_relay_channel[0])
    for sock in inherited:
        with contextlib.suppress(OSError):
            sock.close()
    pair, _relay_pair = _relay_pair, None
    _relay_channel = None
    if pair is not None and isinstance(_current, MeshNode):
        parent_end, child_end = pair
        parent_end.close()
        _relay_channel = (child_end, _current.pid, _current.ready, _current.max_timeout)
    # The parent's node, threads and lock are not ours: forget them without touching them.
    _current = None
    _current_lock = threading.Lock()
    for callback in _fork_callbacks:
        callback()


def _forgotten(self: object) -> None:
    """What a pynng object inherited from the parent does when collected: nothing."""


_fork_callbacks: list[Callable[[], None]] = []


def on_fork_in_child(callback: Callable[[], None]) -> None:
    _fork_callbacks.append(callback)


_hooked = False


def install_hooks() -> None:
    """Register the fork and exit hooks of this process, once (importing this module does not):
    a child forked after the node opened its socket is relayed by it, and a process that exits
    delivers what it queued first."""
    global _hooked
    with _current_lock:
        if _hooked:
            return
        _hooked = True
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
    atexit.register(stop_node)
