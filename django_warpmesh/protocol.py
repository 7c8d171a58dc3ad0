"""The wire protocol: frames to bytes and back. Pure: no I/O, no Django, no threads.

A frame on the wire is ``payload || tag``:

* ``payload`` is a msgpack array ``[version, kind, origin, epoch, seq, body]``;
* ``tag`` is the first 16 bytes of HMAC-SHA256(key, payload).

The tag is checked before a single byte of the payload is parsed, so bytes from a stranger never
reach the msgpack decoder. Every way a frame can be wrong raises :class:`ProtocolError` with a
short ``reason`` that the node counts; nothing else escapes :func:`decode`.

``seq`` numbers the INVALIDATE frames of one ``(origin, epoch)`` from 1; other kinds carry the
sender's latest INVALIDATE seq without consuming one, so a receiver that sees any frame knows
whether it has missed an invalidation.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import io
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Final, NamedTuple, TypeAlias

import msgpack

VERSION: Final = 2
TAG_SIZE: Final = 16
NODE_ID_SIZE: Final = 8
DIGEST_SIZE: Final = 8
# The fixed part of a frame: array header, version, kind, origin, epoch, seq, tag.
FRAME_OVERHEAD: Final = 1 + 1 + 1 + (2 + NODE_ID_SIZE) + 9 + 9 + TAG_SIZE
_MAX_SEQ: Final = (1 << 64) - 1
# A heartbeat period a peer may promise: a day (the period is HEARTBEAT, at most 3,600 s,
# times the mesh's size over HEARTBEAT_FANIN, at most 4,096 peers over 8).
MAX_PERIOD_MS: Final = 86_400_000
_ARRAY6: Final = 0x96


class Kind(enum.IntEnum):
    INVALIDATE = 1
    HEARTBEAT = 2
    BYE = 3
    STATS_REQUEST = 4
    STATS_REPLY = 5
    BYE_ACK = 6  # body: the id of the node whose goodbye was received (it waits for these)


class OpCode(enum.IntEnum):
    DELETE = 1  # args: [key, ...]
    DELETE_UNLESS = 2  # args: [[key, digest], ...]: drop unless the local value has that digest
    CLEAR = 3  # args: None
    PATTERN = 4  # args: glob pattern over full keys
    TAGS = 5  # args: [tag, ...]


Body: TypeAlias = Any
# Lookups by value for decoding: a dict is several times cheaper than calling the enum.
_KINDS: Final = {kind.value: kind for kind in Kind}
_OPCODES: Final = {code.value: code for code in OpCode}


class ProtocolError(ValueError):
    """A frame that must be dropped. ``reason`` is a short, countable word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Named tuples, not frozen dataclasses: every received frame builds one Frame and an Op per op,
# and a frozen dataclass's __init__ costs several times a tuple's on that path.
class Op(NamedTuple):
    location: str  # the cache's LOCATION: the name peers know its storage by
    code: OpCode
    args: Any


class Frame(NamedTuple):
    kind: Kind
    origin: bytes
    epoch: int
    seq: int
    body: Body = None


class Codec:
    """Encodes and decodes frames under one HMAC key. Thread-safe: it holds no mutable state."""

    def __init__(self, key: bytes, *, max_frame_bytes: int = 1024 * 1024) -> None:
        if len(key) < 16:
            raise ValueError("the HMAC key must be at least 16 bytes")
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self.max_frame_bytes = max_frame_bytes

    def _tag(self, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(payload)
        return mac.digest()[:TAG_SIZE]

    def encode(self, frame: Frame) -> bytes:
        payload = msgpack.packb(
            [VERSION, int(frame.kind), frame.origin, frame.epoch, frame.seq, frame.body],
            use_bin_type=True,
        )
        data = payload + self._tag(payload)
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("too_large", f"{len(data)} > {self.max_frame_bytes} bytes")
        return data

    def decode(self, data: bytes) -> Frame:
        size = len(data)
        if size > self.max_frame_bytes:
            raise ProtocolError("too_large", f"{size} bytes")
        if size < 8 + TAG_SIZE:
            raise ProtocolError("malformed", "too short")
        if data[0] == _ARRAY6 and data[1] != VERSION and data[1] < 0x80:
            raise ProtocolError("unknown_version", str(data[1]))
        payload, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(payload), tag):
            raise ProtocolError("bad_mac")
        try:
            fields = msgpack.unpackb(
                payload,
                raw=False,
                use_list=True,
                strict_map_key=True,
            )
        except Exception as exc:  # msgpack raises a zoo of types; all mean the same here.
            raise ProtocolError("malformed", type(exc).__name__) from None
        return _validate_frame(fields)


def _validate_frame(fields: object) -> Frame:
    if not isinstance(fields, list) or len(fields) != 6:
        raise ProtocolError("malformed", "not a 6-element array")
    version, kind_value, origin, epoch, seq, body = fields
    if version != VERSION:
        raise ProtocolError("unknown_version", repr(version))
    kind = _KINDS.get(kind_value) if type(kind_value) is int else None
    if kind is None:
        raise ProtocolError("malformed", f"unknown kind {kind_value!r}")
    if not isinstance(origin, bytes) or len(origin) != NODE_ID_SIZE:
        raise ProtocolError("malformed", "origin")
    for name, number in (("epoch", epoch), ("seq", seq)):
        if type(number) is not int or not 0 <= number <= _MAX_SEQ:
            raise ProtocolError("malformed", name)
    validator = _BODY_VALIDATORS[kind]
    return Frame(kind, origin, epoch, seq, validator(body))


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is str for item in value)


def _digest_pairs(args: object) -> bool:
    return isinstance(args, list) and all(
        isinstance(pair, list)
        and len(pair) == 2
        and type(pair[0]) is str
        and isinstance(pair[1], bytes)
        and len(pair[1]) == DIGEST_SIZE
        for pair in args
    )


# What each op's arguments must be on the wire: one entry per OpCode (test_registries.py).
OP_ARGUMENTS: dict[OpCode, Callable[[object], bool]] = {
    OpCode.DELETE: _is_str_list,  # keys
    OpCode.DELETE_UNLESS: _digest_pairs,  # [key, digest of the value written]
    OpCode.CLEAR: lambda args: args is None,
    OpCode.PATTERN: lambda args: type(args) is str,  # a glob
    OpCode.TAGS: _is_str_list,  # tags
}


def _validate_ops(body: object) -> list[Op]:
    if not isinstance(body, list) or not body:
        raise ProtocolError("malformed", "invalidate body")
    ops = []
    for item in body:
        if not isinstance(item, list) or len(item) != 3 or type(item[0]) is not str:
            raise ProtocolError("malformed", "op")
        location, code_value, args = item
        code = _OPCODES.get(code_value) if type(code_value) is int else None
        if code is None:
            raise ProtocolError("malformed", f"unknown op {code_value!r}")
        if not OP_ARGUMENTS[code](args):
            raise ProtocolError("malformed", f"{code.name} arguments")
        ops.append(Op(location, code, args))
    return ops


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a node says of itself every heartbeat period (and at once on a new connection).

    ``echo`` lets some peers measure their round trip to us without a ping frame of their own:
    for each, the ``sent_ns`` of its last heartbeat and how long we held it. ``period_ms`` is
    the sender's promise of its next heartbeat (its period grows with the mesh, so that each
    node hears a bounded number of heartbeats whatever the mesh's size): peers count it lost
    after ``LIVENESS_HEARTBEATS`` periods of silence. 0: not stated (the receiver's own).
    """

    address: str
    sent_ns: int
    echo: tuple[tuple[bytes, int, int], ...] = ()
    observer: bool = False
    period_ms: int = 0


def _validate_heartbeat(body: object) -> Heartbeat:
    if not isinstance(body, list) or len(body) != 5:
        raise ProtocolError("malformed", "heartbeat body")
    address, sent_ns, echo, observer, period_ms = body
    if type(address) is not str or type(sent_ns) is not int or type(observer) is not bool:
        raise ProtocolError("malformed", "heartbeat fields")
    if type(period_ms) is not int or not 0 <= period_ms <= MAX_PERIOD_MS:
        raise ProtocolError("malformed", "heartbeat period")
    if not isinstance(echo, list) or not all(
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], bytes)
        and len(entry[0]) == NODE_ID_SIZE
        and type(entry[1]) is int
        and type(entry[2]) is int
        for entry in echo
    ):
        raise ProtocolError("malformed", "heartbeat echo")
    echoed = tuple((e[0], e[1], e[2]) for e in echo)
    return Heartbeat(address, sent_ns, echoed, observer, period_ms)


class Stamped(NamedTuple):
    """A control frame's body (every kind but INVALIDATE and HEARTBEAT): ``sent_ns`` is the
    sender's stamp, strictly increasing over all its control frames in an epoch, so a replayed
    one is known as old however long ago it was captured."""

    sent_ns: int
    value: Any


def stamped(sent_ns: int, value: Any) -> list[Any]:
    return [sent_ns, value]


def _stamped(validate: Callable[[object], Any]) -> Callable[[object], Stamped]:
    def validate_stamped(body: object) -> Stamped:
        if not isinstance(body, list) or len(body) != 2 or type(body[0]) is not int:
            raise ProtocolError("malformed", "control frame body")
        return Stamped(body[0], validate(body[1]))

    return validate_stamped


def _validate_none(body: object) -> None:
    if body is not None:
        raise ProtocolError("malformed", "unexpected body")


def _validate_node_id(body: object) -> bytes:
    if not isinstance(body, bytes) or len(body) != NODE_ID_SIZE:
        raise ProtocolError("malformed", "node id")
    return body


class StatsRequest(NamedTuple):
    """Asks for a node's stats, to be sent to ``reply_to`` (the asker's ``host:port``)."""

    request_id: int
    reply_to: str


def _validate_stats_request(body: object) -> StatsRequest:
    if (
        not isinstance(body, list)
        or len(body) != 2
        or type(body[0]) is not int
        or type(body[1]) is not str
    ):
        raise ProtocolError("malformed", "stats request")
    return StatsRequest(body[0], body[1])


@dataclasses.dataclass(frozen=True, slots=True)
class StatsReply:
    request_id: int
    requester: bytes
    stats: dict[str, Any]


def _validate_stats_reply(body: object) -> StatsReply:
    if (
        not isinstance(body, list)
        or len(body) != 3
        or type(body[0]) is not int
        or not isinstance(body[1], bytes)
        or not isinstance(body[2], dict)
    ):
        raise ProtocolError("malformed", "stats reply")
    return StatsReply(body[0], body[1], body[2])


_BODY_VALIDATORS: Final = {
    Kind.INVALIDATE: _validate_ops,
    Kind.HEARTBEAT: _validate_heartbeat,
    Kind.BYE: _stamped(_validate_none),
    Kind.STATS_REQUEST: _stamped(_validate_stats_request),
    Kind.STATS_REPLY: _stamped(_validate_stats_reply),
    Kind.BYE_ACK: _stamped(_validate_node_id),
}


# Builders: the only way the node makes bodies, so what is sent always passes validation.


def ops_body(ops: Iterable[Op]) -> list[list[Any]]:
    return [[op.location, int(op.code), op.args] for op in ops]


def heartbeat_body(heartbeat: Heartbeat) -> list[Any]:
    return [
        heartbeat.address,
        heartbeat.sent_ns,
        [list(entry) for entry in heartbeat.echo],
        heartbeat.observer,
        heartbeat.period_ms,
    ]


def stats_reply_body(reply: StatsReply) -> list[Any]:
    return [reply.request_id, reply.requester, reply.stats]


def encodable(text: str) -> bool:
    """Whether ``text`` can travel in a frame: msgpack sends a str as UTF-8, which a lone
    surrogate (what ``os.fsdecode`` makes of a non-UTF-8 file name) is not."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The digest of a pickle holding a set is taken over a canonical form, costly per byte (about
# 0.15 ms per KB of small objects; see docs/consistency.md): over this size, over the bytes.
CANONICAL_LIMIT: Final = 16 * 1024
# A non-empty set in a pickle of protocol 4 or later is EMPTY_SET, MEMOIZE, MARK; a frozenset
# ends with FROZENSET, MEMOIZE. The same bytes can occur in data too: that only costs the check.
_SET_OPCODES: Final = (b"\x8f\x94(", b"\x91\x94")


def digest(stored: bytes) -> bytes:
    """The digest peers compare to decide whether they hold the same value.

    ``stored`` is a value as this process's cache pickled it, never bytes from the wire. Equal
    values pickled by two processes must get the same digest, or each fill evicts the other's
    copy. Their pickles differ where a set or frozenset is: its order follows the hash seed of
    the process that pickled it. So a pickle that holds one is digested in a canonical form
    (each set's elements in a fixed order). A dict's order, by contrast, survives pickling and
    shows to readers: dicts in different orders are different values here.
    """
    if len(stored) <= CANONICAL_LIMIT and (_SET_OPCODES[0] in stored or _SET_OPCODES[1] in stored):
        canonical = _canonical_pickle(stored)
        if canonical is not None:
            stored = canonical
    return hashlib.blake2b(stored, digest_size=DIGEST_SIZE).digest()


def _canonical_pickle(stored: bytes) -> bytes | None:
    """The value in ``stored`` pickled again with its sets in order; None if that fails."""
    if stored[:1] != pickle.PROTO or len(stored) < 2 or stored[1] < 4:
        return None
    try:
        value = pickle.loads(stored)
        buffer = io.BytesIO()
        _CanonicalPickler(buffer, stored[1]).dump(value)
    except Exception:
        # Not a pickle, a class gone, a recursion too deep for the pure-Python pickler: such a
        # value is compared by its bytes, which is never wrong, only a miss on a peer.
        return None
    return buffer.getvalue()


class _CanonicalPickler(pickle._Pickler):
    """Python's own pickler, writing each set's elements in an order that does not depend on
    the hash seed: by the element itself for str, bytes and int, else by its canonical pickle.
    Used for digests only; nothing it writes is ever unpickled."""

    proto: int
    memo: dict[int, tuple[int, Any]]
    write: Callable[[bytes], object]
    save: Callable[[Any], None]
    memoize: Callable[[Any], None]
    get: Callable[[int], bytes]

    def _in_order(self, items: Iterable[Any]) -> list[Any]:
        return sorted(items, key=self._order_key)

    def _order_key(self, item: Any) -> tuple[int, str, Any]:
        kind = type(item)
        if kind is str or kind is bytes or kind is int:
            return (0, kind.__name__, item)
        buffer = io.BytesIO()
        _CanonicalPickler(buffer, self.proto).dump(item)
        return (1, "", buffer.getvalue())

    def _save_set(self, obj: set[Any]) -> None:
        self.write(pickle.EMPTY_SET)
        self.memoize(obj)
        items = self._in_order(obj)
        if items:
            self.write(pickle.MARK)
            for item in items:
                self.save(item)
            self.write(pickle.ADDITEMS)

    def _save_frozenset(self, obj: frozenset[Any]) -> None:
        self.write(pickle.MARK)
        for item in self._in_order(obj):
            self.save(item)
        if id(obj) in self.memo:  # it contains itself: what was written is dropped
            self.write(pickle.POP_MARK + self.get(self.memo[id(obj)][0]))
            return
        self.write(pickle.FROZENSET)
        self.memoize(obj)

    dispatch: ClassVar[dict[type, Callable[..., None]]] = {
        **pickle._Pickler.dispatch,
        set: _save_set,
        frozenset: _save_frozenset,
    }


def split_ops(ops: Sequence[Op], budget: int) -> list[list[Op]]:
    """Group ops into frames whose encoded bodies stay under ``budget`` bytes.

    An op too large on its own for one frame (thousands of keys) is split by its keys; a single
    key larger than the budget cannot be sent, and the caller turns it into a CLEAR.
    """
    if len(msgpack.packb(ops_body(ops), use_bin_type=True)) <= budget:
        return [list(ops)] if ops else []  # the usual case: one pack instead of one per op
    frames: list[list[Op]] = []
    current: list[Op] = []
    used = 0
    for op in ops:
        for piece in _split_op(op, budget):
            size = _op_size(piece)
            if current and used + size > budget:
                frames.append(current)
                current, used = [], 0
            current.append(piece)
            used += size
    if current:
        frames.append(current)
    return frames


def _op_size(op: Op) -> int:
    return len(msgpack.packb([op.location, int(op.code), op.args], use_bin_type=True))


def _split_op(op: Op, budget: int) -> list[Op]:
    size = _op_size(op)
    if not isinstance(op.args, list) or size <= budget or len(op.args) < 2:
        return [op]
    # Pieces of about half a budget, cut by count: one pack per piece rather than one per key
    # (a delete_many of 200,000 keys is split on the writer's sender thread). A piece still too
    # large, its keys longer than the average, is cut again.
    pieces_wanted = -(-2 * size // budget)
    step = -(-len(op.args) // pieces_wanted)
    pieces: list[Op] = []
    for start in range(0, len(op.args), step):
        pieces += _split_op(Op(op.location, op.code, op.args[start : start + step]), budget)
    return pieces
