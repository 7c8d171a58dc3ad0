"""What the sender makes of the invalidations queued: each key once, with its last operation.

Pure: the frame pipeline calls it with what it took off the queue, and the tests and benchmarks
call it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django_warpmesh import protocol
from django_warpmesh.protocol import Op, OpCode

# A single op sent as it is, unsplit, when it names at most this many keys or tags.
SINGLE_OP_MAX_ITEMS = 64


def single_op(location: str, code: OpCode, arg: Any) -> Op | None:
    """One queued op as ``coalesce`` would send it; None when it needs more (a large list)."""
    if code is OpCode.DELETE_UNLESS:
        key, stored = arg
        return Op(location, code, [[key, protocol.digest(stored)]])
    if code is OpCode.DELETE or code is OpCode.TAGS:
        items = list(dict.fromkeys(arg))
        return Op(location, code, items) if len(items) <= SINGLE_OP_MAX_ITEMS else None
    if code is OpCode.CLEAR or code is OpCode.PATTERN:
        return Op(location, code, arg)
    raise ValueError(f"no rule for sending {code!r} alone")


def coalesce(queue: Sequence[tuple[str, OpCode, Any]], overflowed: set[str]) -> list[Op]:
    """Merge queued invalidations: a key once (its last op wins), a clear swallows its location."""
    # The sender's per-key loop: a write loop's throughput is bounded by it, hence the locals.
    clear, delete, delete_unless, tags_code, pattern = (
        OpCode.CLEAR,
        OpCode.DELETE,
        OpCode.DELETE_UNLESS,
        OpCode.TAGS,
        OpCode.PATTERN,
    )
    cleared: set[str] = set(overflowed)
    keys: dict[str, dict[str, bytes | None]] = {}
    tags: dict[str, dict[str, None]] = {}
    patterns: dict[str, dict[str, None]] = {}
    for location, code, arg in queue:
        if code is delete_unless and location not in cleared:
            location_keys = keys.get(location)
            if location_keys is None:
                location_keys = keys[location] = {}
            key, stored = arg
            location_keys[key] = stored
        elif code is clear:
            cleared.add(location)
            keys.pop(location, None)
            tags.pop(location, None)
            patterns.pop(location, None)
        elif location in cleared:
            # Later ops after a clear still matter only for values stored after it; a clear
            # drops every copy on the peers, so it already covers them.
            continue
        elif code is delete:
            keys.setdefault(location, {}).update(dict.fromkeys(arg))
        elif code is tags_code:
            tags.setdefault(location, {}).update(dict.fromkeys(arg))
        elif code is pattern:
            patterns.setdefault(location, {})[arg] = None
        else:
            # A new op code needs its rule here (and in single_op): never sent as another.
            raise ValueError(f"no coalescing rule for {code!r}")
    return _merged(cleared, keys, tags, patterns)


def _merged(
    cleared: set[str],
    keys: dict[str, dict[str, bytes | None]],
    tags: dict[str, dict[str, None]],
    patterns: dict[str, dict[str, None]],
) -> list[Op]:
    """What the coalesced invalidations are sent as: clears first, then per cache its
    deletes, deletes unless the value is the same (by digest), tags and patterns."""
    delete, delete_unless = OpCode.DELETE, OpCode.DELETE_UNLESS
    ops = [Op(location, OpCode.CLEAR, None) for location in cleared]
    digest = protocol.digest
    for location, entries in keys.items():
        deletes = [key for key, stored in entries.items() if stored is None]
        unless = [[key, digest(stored)] for key, stored in entries.items() if stored is not None]
        if deletes:
            ops.append(Op(location, delete, deletes))
        if unless:
            ops.append(Op(location, delete_unless, unless))
    ops.extend(Op(location, OpCode.TAGS, list(names)) for location, names in tags.items())
    for location, names in patterns.items():
        ops.extend(Op(location, OpCode.PATTERN, pattern) for pattern in names)
    return ops
