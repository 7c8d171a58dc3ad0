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


def single_op(alias: str, code: OpCode, arg: Any) -> Op | None:
    """One queued op as ``coalesce`` would send it; None when it needs more (a large list)."""
    if code is OpCode.DELETE_UNLESS:
        key, stored = arg
        return Op(alias, code, [[key, protocol.digest(stored)]])
    if code is OpCode.DELETE or code is OpCode.TAGS:
        items = list(dict.fromkeys(arg))
        return Op(alias, code, items) if len(items) <= SINGLE_OP_MAX_ITEMS else None
    if code is OpCode.CLEAR or code is OpCode.PATTERN:
        return Op(alias, code, arg)
    raise ValueError(f"no rule for sending {code!r} alone")


def coalesce(queue: Sequence[tuple[str, OpCode, Any]], overflowed: set[str]) -> list[Op]:
    """Merge queued invalidations: a key once (its last op wins), a clear swallows its alias."""
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
    for alias, code, arg in queue:
        if code is delete_unless and alias not in cleared:
            alias_keys = keys.get(alias)
            if alias_keys is None:
                alias_keys = keys[alias] = {}
            key, stored = arg
            alias_keys[key] = stored
        elif code is clear:
            cleared.add(alias)
            keys.pop(alias, None)
            tags.pop(alias, None)
            patterns.pop(alias, None)
        elif alias in cleared:
            # Later ops after a clear still matter only for values stored after it; a clear
            # drops every copy on the peers, so it already covers them.
            continue
        elif code is delete:
            keys.setdefault(alias, {}).update(dict.fromkeys(arg))
        elif code is tags_code:
            tags.setdefault(alias, {}).update(dict.fromkeys(arg))
        elif code is pattern:
            patterns.setdefault(alias, {})[arg] = None
        else:
            # A new op code needs its rule here (and in single_op): never sent as another.
            raise ValueError(f"no coalescing rule for {code!r}")
    ops = [Op(alias, clear, None) for alias in cleared]
    digest = protocol.digest
    for alias, entries in keys.items():
        deletes = [key for key, stored in entries.items() if stored is None]
        unless = [[key, digest(stored)] for key, stored in entries.items() if stored is not None]
        if deletes:
            ops.append(Op(alias, delete, deletes))
        if unless:
            ops.append(Op(alias, delete_unless, unless))
    ops.extend(Op(alias, tags_code, list(names)) for alias, names in tags.items())
    for alias, names in patterns.items():
        ops.extend(Op(alias, OpCode.PATTERN, pattern) for pattern in names)
    return ops
