"""What the PostgreSQL transport puts in a ``NOTIFY`` payload, and takes back out.

A payload is text, shorter than 8000 bytes (``BLCKSZ - NAMEDATALEN - 128`` with the default
8 kB pages), that must be valid in the server's encoding and has no NUL byte. Frames are bytes,
so they are sent as standard base64: ASCII only, which every server encoding (all are ASCII
supersets) stores byte for byte. Denser ASCII encodings exist (base85 carries 6399 bytes a
payload instead of 5997), but Python's base85 is pure Python, several hundred times slower than
:mod:`binascii`'s base64 (milliseconds a 4 kB frame, on the sending thread of every cache
write), for 7 % more room no default frame needs.

A stats reply (``mesh_status``; up to 1 MiB) does not fit one payload: it is cut into chunks,
each sent behind a header ``<16 hex id>:<index>:<count>:``, and put back together by the
receiving listener (:class:`ReplyAssembler`).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import sys

# A payload must be shorter than NOTIFY_PAYLOAD_MAX_LENGTH (8000 bytes with PostgreSQL's default
# 8 kB pages; a server built with smaller pages would refuse frames near the limit).
PAYLOAD_LIMIT = 7999
# The largest frame whose base64 (4 characters per 3 bytes, padded) fits in one payload: 5997.
MAX_FRAME_BYTES = PAYLOAD_LIMIT // 4 * 3

# Stats replies: at most 1 MiB each, cut into chunks that each fit one payload behind a header
# "<16 hex id>:<index>:<count>:" (at most 31 characters).
MAX_REPLY_BYTES = 1 << 20
REPLY_HEADER_CHARS = 32
REPLY_CHUNK_BYTES = (PAYLOAD_LIMIT - REPLY_HEADER_CHARS) // 4 * 3
MAX_REPLY_CHUNKS = -(-MAX_REPLY_BYTES // REPLY_CHUNK_BYTES)
# Replies being reassembled at once, at most, and how long an incomplete one is kept.
MAX_OPEN_REPLIES = 8
REPLY_TIMEOUT = 10.0
REPLY_ID_RE = re.compile(rb"[0-9a-f]{16}")


def encode_payload(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def decode_payload(payload: bytes) -> bytes | None:
    """The bytes a payload carries, or None if it is not base64 as :func:`encode_payload`
    writes it."""
    try:
        if sys.version_info >= (3, 11):
            data = binascii.a2b_base64(payload, strict_mode=True)
        else:
            data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Both accept padding past a complete group ("QUJD=" is b"ABC"): only the canonical length.
    if len(payload) != -(-len(data) // 3) * 4:
        return None
    return data


def reply_payloads(data: bytes) -> list[str]:
    """The payloads of one stats reply (at most :data:`MAX_REPLY_BYTES`), in order."""
    reply_id = secrets.token_hex(8)
    # An empty reply is still one chunk: the inbox learns it arrived.
    chunks = [data[i : i + REPLY_CHUNK_BYTES] for i in range(0, len(data), REPLY_CHUNK_BYTES)]
    chunks = chunks or [b""]
    count = len(chunks)
    return [
        f"{reply_id}:{index}:{count}:{encode_payload(chunk)}" for index, chunk in enumerate(chunks)
    ]


class MalformedPayload(ValueError):
    """A payload that is not one :func:`reply_payloads` writes."""


class _PartialReply:
    """A stats reply whose chunks are still arriving."""

    __slots__ = ("chunks", "count", "size", "started")

    def __init__(self, count: int, started: float) -> None:
        self.count = count
        self.started = started
        self.size = 0
        self.chunks: dict[int, bytes] = {}


class ReplyAssembler:
    """Stats replies put back together from their chunks, those of several replies arriving
    interleaved. Anyone on the server can notify the channel: what is not a chunk is refused.
    Bounded: :data:`MAX_OPEN_REPLIES` at once, each complete within :data:`REPLY_TIMEOUT`
    seconds, or dropped (and counted). Used by one thread, the listener."""

    def __init__(self) -> None:
        self._partial: dict[bytes, _PartialReply] = {}
        self.received = 0
        self.dropped = 0

    @property
    def pending(self) -> bool:
        """Replies are incomplete: :meth:`expire` is to be called now and then."""
        return bool(self._partial)

    def add(self, payload: bytes, now: float) -> bytes | None:
        """The whole reply once ``payload`` was its last chunk missing, else None; raises
        :class:`MalformedPayload`."""
        reply_id, index, count, chunk = self._parse(payload)
        self.expire(now)
        partial = self._partial.get(reply_id)
        if partial is None:
            if len(self._partial) >= MAX_OPEN_REPLIES:
                del self._partial[next(iter(self._partial))]  # the oldest
                self.dropped += 1
            partial = self._partial[reply_id] = _PartialReply(count, now)
        if partial.count != count:
            raise MalformedPayload("a chunk count that differs from its reply's")
        if index in partial.chunks:
            return None
        partial.chunks[index] = chunk
        partial.size += len(chunk)
        if partial.size > MAX_REPLY_BYTES:
            del self._partial[reply_id]
            self.dropped += 1
            return None
        if len(partial.chunks) < count:
            return None
        del self._partial[reply_id]
        self.received += 1
        return b"".join(partial.chunks[i] for i in range(count))

    def expire(self, now: float) -> None:
        """Drop the replies still incomplete :data:`REPLY_TIMEOUT` seconds after they began."""
        for reply_id in [
            reply_id
            for reply_id, partial in self._partial.items()
            if now - partial.started > REPLY_TIMEOUT
        ]:
            del self._partial[reply_id]
            self.dropped += 1

    @staticmethod
    def _parse(payload: bytes) -> tuple[bytes, int, int, bytes]:
        """A chunk's reply id, index, count and bytes."""
        fields = payload.split(b":", 3)
        if len(fields) != 4:
            raise MalformedPayload("not a reply chunk")
        reply_id, index_text, count_text, body = fields
        chunk = decode_payload(body) if body else b""
        if (
            chunk is None
            or not REPLY_ID_RE.fullmatch(reply_id)
            or not (index_text.isdigit() and count_text.isdigit())
            or len(index_text) > 6
            or len(count_text) > 6
            or not 0 <= int(index_text) < int(count_text) <= MAX_REPLY_CHUNKS
            or len(chunk) > REPLY_CHUNK_BYTES
        ):
            raise MalformedPayload("not a reply chunk")
        return reply_id, int(index_text), int(count_text), chunk
