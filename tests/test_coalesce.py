"""The sender's coalescing: fewer ops on the wire, never a weaker invalidation."""

from __future__ import annotations

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
