"""Every frame kind and every op code is handled everywhere it must be: a new member without
its validator, handler or coalescing rule fails here, not silently on the wire."""

from __future__ import annotations

from typing import Any

import pytest

from django_warpmesh import protocol
from django_warpmesh.conf import parse
from django_warpmesh.node import MeshNode
from django_warpmesh.node.ops import coalesce, single_op
from django_warpmesh.node_factory import StaticRegistry
from django_warpmesh.protocol import Kind, OpCode

# An argument of each op code as a cache queues it.
QUEUED: dict[OpCode, Any] = {
    OpCode.DELETE: [":1:k"],
    OpCode.DELETE_UNLESS: (":1:k", b"pickled"),
    OpCode.CLEAR: None,
    OpCode.PATTERN: ":1:user:*",
    OpCode.TAGS: ["t:shop.product"],
}


def test_every_kind_has_a_body_validator() -> None:
    assert set(protocol._BODY_VALIDATORS) == set(Kind)


def test_every_control_kind_has_a_handler_on_the_receiving_side() -> None:
    node = MeshNode(parse({"PEERS": []}), b"k" * 32, StaticRegistry([]))
    assert set(node.receiver.control_handlers) == set(Kind) - {Kind.INVALIDATE}


def test_every_op_code_has_an_argument_rule_on_the_wire() -> None:
    assert set(protocol.OP_ARGUMENTS) == set(OpCode)
    assert set(QUEUED) == set(OpCode)


@pytest.mark.parametrize("code", list(OpCode), ids=lambda code: code.name)
def test_every_op_code_is_sent_as_itself_alone_and_coalesced(code: OpCode) -> None:
    (merged,) = coalesce([("c", code, QUEUED[code])], set())
    alone = single_op("c", code, QUEUED[code])
    for op in (merged, alone):
        assert op is not None
        assert op.code is code
        assert protocol.OP_ARGUMENTS[code](op.args)  # what is sent passes validation
