"""The sender's coalescing: fewer ops on the wire, never a weaker invalidation."""

from __future__ import annotations

import fnmatch
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from django_warpmesh.node import coalesce
from django_warpmesh.protocol import Op, OpCode, digest


def test_a_key_is_sent_once_with_its_last_operation() -> None:
    ops = coalesce(
        [
            ("c", OpCode.DELETE_UNLESS, (":1:a", b"v1")),
            ("c", OpCode.DELETE, [":1:a", ":1:b"]),
            ("c", OpCode.DELETE_UNLESS, (":1:b", b"v2")),
            ("c", OpCode.DELETE, [":1:a"]),
        ],
        set(),
    )
    assert ops == [
        Op("c", OpCode.DELETE, [":1:a"]),
        Op("c", OpCode.DELETE_UNLESS, [[":1:b", digest(b"v2")]]),
    ]


def test_a_clear_swallows_earlier_and_later_ops_of_its_cache_only() -> None:
    ops = coalesce(
        [
            ("c", OpCode.DELETE, [":1:a"]),
            ("c", OpCode.TAGS, ["t:x"]),
            ("c", OpCode.PATTERN, ":1:u*"),
            ("c", OpCode.CLEAR, None),
            ("c", OpCode.DELETE, [":1:b"]),
            ("other", OpCode.DELETE, [":1:a"]),
        ],
        set(),
    )
    assert ops == [Op("c", OpCode.CLEAR, None), Op("other", OpCode.DELETE, [":1:a"])]


def test_an_overflowed_cache_is_cleared() -> None:
    assert coalesce([("c", OpCode.DELETE, [":1:a"])], {"c"}) == [Op("c", OpCode.CLEAR, None)]


def test_tags_and_patterns_are_merged_per_cache() -> None:
    ops = coalesce(
        [
            ("c", OpCode.TAGS, ["t:x", "s:y"]),
            ("c", OpCode.TAGS, ["s:y", "r:x:1"]),
            ("c", OpCode.PATTERN, ":1:a*"),
            ("c", OpCode.PATTERN, ":1:a*"),
        ],
        set(),
    )
    assert ops == [Op("c", OpCode.TAGS, ["t:x", "s:y", "r:x:1"]), Op("c", OpCode.PATTERN, ":1:a*")]


# -- property: coalescing never leaves a peer with a value a write made stale -----------------

ALIASES = ("c", "d")
KEYS = (":1:a", ":1:b", ":1:ab")
VALUES = (b"v1", b"v2")
TAG_OF = {":1:a": "t:x", ":1:b": "t:y", ":1:ab": "t:x"}

queued_ops = st.one_of(
    st.tuples(
        st.sampled_from(ALIASES),
        st.just(OpCode.DELETE),
        st.lists(st.sampled_from(KEYS), max_size=2),
    ),
    st.tuples(
        st.sampled_from(ALIASES),
        st.just(OpCode.DELETE_UNLESS),
        st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)),
    ),
    st.tuples(st.sampled_from(ALIASES), st.just(OpCode.CLEAR), st.none()),
    st.tuples(
        st.sampled_from(ALIASES), st.just(OpCode.PATTERN), st.sampled_from((":1:a*", ":1:b"))
    ),
    st.tuples(st.sampled_from(ALIASES), st.just(OpCode.TAGS), st.lists(st.just("t:x"), max_size=1)),
)


def _apply(
    held: dict[tuple[str, str], bytes], alias: str, code: OpCode, args: Any, dig: bool
) -> None:
    """What a peer does with one op (``dig``: DELETE_UNLESS carries digests, as on the wire)."""
    for entry in [entry for entry in held if entry[0] == alias]:
        key = entry[1]
        if code is OpCode.DELETE:
            dropped = key in args
        elif code is OpCode.DELETE_UNLESS:
            pairs = args if dig else [[args[0], digest(args[1])]]
            dropped = any(k == key and d != digest(held[entry]) for k, d in pairs)
        elif code is OpCode.CLEAR:
            dropped = True
        elif code is OpCode.PATTERN:
            dropped = fnmatch.fnmatchcase(key, args)
        else:
            dropped = TAG_OF[key] in args
        if dropped:
            del held[entry]


@given(
    queue=st.lists(queued_ops, max_size=12),
    overflowed=st.sets(st.sampled_from(ALIASES)),
    peer=st.dictionaries(
        st.tuples(st.sampled_from(ALIASES), st.sampled_from(KEYS)), st.sampled_from(VALUES)
    ),
)
def test_coalescing_is_never_weaker_than_the_queue_in_order(
    queue: list[tuple[str, OpCode, Any]], overflowed: set[str], peer: dict[tuple[str, str], bytes]
) -> None:
    in_order = dict(peer)
    for alias in overflowed:
        _apply(in_order, alias, OpCode.CLEAR, None, dig=False)
    for alias, code, args in queue:
        _apply(in_order, alias, code, args, dig=False)
    coalesced = dict(peer)
    for op in coalesce(queue, overflowed):
        _apply(coalesced, op.alias, op.code, op.args, dig=True)
    # Where the writer's last op on a key stored a value, a peer holding exactly it is not stale.
    last_written: dict[tuple[str, str], bytes] = {}
    for alias, code, args in queue:
        if code is OpCode.DELETE_UNLESS:
            last_written[(alias, args[0])] = args[1]
        else:
            _apply(last_written, alias, code, args, dig=False)
    for entry, value in coalesced.items():
        assert entry in in_order or last_written.get(entry) == value, (entry, value)
