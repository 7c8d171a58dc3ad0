"""The store's dispatch of peers' ops: one applier per ``OpCode``, and no other."""

from __future__ import annotations

import itertools

import pytest

from django_warpmesh import store as mesh_store
from django_warpmesh.protocol import Op, OpCode
from django_warpmesh.store import APPLIERS, get_store

_names = itertools.count()


def test_every_opcode_has_an_applier() -> None:
    assert set(APPLIERS) == set(OpCode)
    assert all(callable(applier) for applier in APPLIERS.values())


@pytest.mark.parametrize("code", list(OpCode), ids=[code.name for code in OpCode])
def test_an_opcode_without_an_applier_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, code: OpCode
) -> None:
    """Not skipped as an unknown code would be by an if-chain: apply() raises."""
    monkeypatch.setattr(
        mesh_store, "APPLIERS", {other: a for other, a in APPLIERS.items() if other is not code}
    )
    store = get_store(f"test-store-{next(_names)}")
    with pytest.raises(KeyError):
        store.apply([Op(store.location, code, None)])
    assert not store.lock.locked()
