"""The wire protocol in isolation: encoding, decoding, rejection reasons, and fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_warpmesh import protocol
from django_warpmesh.cache import MeshCache
from django_warpmesh.protocol import (
    DIGEST_SIZE,
    FRAME_OVERHEAD,
    NODE_ID_SIZE,
    TAG_SIZE,
    VERSION,
    Codec,
    Frame,
    Heartbeat,
    Kind,
    Op,
    OpCode,
    ProtocolError,
    Stamped,
    StatsReply,
)
from harness import ROOT
from tests import digestproc

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ORIGIN = b"\x01\x02\x03\x04\x05\x06\x07\x08"
EPOCH = 1_700_000_000_000  # milliseconds, as the node uses
MAX_U64 = (1 << 64) - 1
REASONS = {"bad_mac", "too_large", "unknown_version", "malformed"}

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sign(payload: bytes, key: bytes = KEY) -> bytes:
    """What a peer holding ``key`` would put on the wire for ``payload``: computed independently."""
    return payload + hmac.new(key, payload, hashlib.sha256).digest()[:TAG_SIZE]


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def signed_fields(
    body: object,
    *,
    version: object = VERSION,
    kind: object = int(Kind.INVALIDATE),
    origin: object = ORIGIN,
    epoch: object = EPOCH,
    seq: object = 1,
) -> bytes:
    return sign(pack([version, kind, origin, epoch, seq, body]))


def reason_of(codec: Codec, data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    return info.value.reason


def outcome(codec: Codec, data: bytes) -> Frame | str:
    """The decoded frame, or the reason it was dropped. Any other exception propagates."""
    try:
        return codec.decode(data)
    except ProtocolError as exc:
        return exc.reason


@pytest.fixture
def codec() -> Codec:
    return Codec(KEY)


def valid_frame(codec: Codec) -> bytes:
    ops = [Op("default", OpCode.DELETE, [":1:user:42", ":1:user:43"])]
    return codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 7, protocol.ops_body(ops)))


# --- Round trips ------------------------------------------------------------------------------


ALL_OPS = [
    Op("default", OpCode.DELETE, [":1:user:42", ":1:user:43"]),
    Op("default", OpCode.DELETE_UNLESS, [[":1:page:home", protocol.digest(b"rendered")]]),
    Op("other", OpCode.CLEAR, None),
    Op("default", OpCode.PATTERN, ":1:session:*"),
    Op("bulk", OpCode.TAGS, ["articles", "users"]),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: op.code.name)
def test_each_opcode_round_trips(codec: Codec, op: Op) -> None:
    data = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 3, protocol.ops_body([op])))
    frame = codec.decode(data)
    assert frame == Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 3, [op])
    assert type(frame.kind) is Kind
    assert type(frame.body[0].code) is OpCode


def test_all_opcodes_in_one_frame_keep_their_order(codec: Codec) -> None:
    frame = codec.decode(
        codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, protocol.ops_body(ALL_OPS)))
    )
    assert frame.body == ALL_OPS


def test_ops_body_is_the_documented_wire_shape() -> None:
    body = protocol.ops_body(ALL_OPS[:3])
    assert body == [
        ["default", 1, [":1:user:42", ":1:user:43"]],
        ["default", 2, [[":1:page:home", protocol.digest(b"rendered")]]],
        ["other", 3, None],
    ]
    assert all(type(entry[1]) is int for entry in body)


def test_heartbeat_round_trips(codec: Codec) -> None:
    heartbeat = Heartbeat(
        address="10.0.0.5:7934",
        sent_ns=123_456_789_000,
        echo=((b"A" * NODE_ID_SIZE, 987_654_321, 1_500), (b"B" * NODE_ID_SIZE, 0, 0)),
        observer=True,
        period_ms=7_875,
    )
    body = protocol.heartbeat_body(heartbeat)
    assert body == [
        "10.0.0.5:7934",
        123_456_789_000,
        [[b"A" * NODE_ID_SIZE, 987_654_321, 1_500], [b"B" * NODE_ID_SIZE, 0, 0]],
        True,
        7_875,
    ]
    frame = codec.decode(codec.encode(Frame(Kind.HEARTBEAT, ORIGIN, EPOCH, 9, body)))
    assert frame == Frame(Kind.HEARTBEAT, ORIGIN, EPOCH, 9, heartbeat)


def test_empty_heartbeat_round_trips(codec: Codec) -> None:
    heartbeat = Heartbeat("", 0)
    frame = codec.decode(
        codec.encode(Frame(Kind.HEARTBEAT, ORIGIN, 0, 0, protocol.heartbeat_body(heartbeat)))
    )
    assert frame.body == heartbeat
    assert frame.body.echo == ()
    assert frame.body.observer is False
    assert frame.body.period_ms == 0


@pytest.mark.parametrize("period_ms", [-1, protocol.MAX_PERIOD_MS + 1, 1.5, True, None])
def test_a_heartbeat_promising_an_impossible_period_is_rejected(
    codec: Codec, period_ms: object
) -> None:
    body = [*protocol.heartbeat_body(Heartbeat("", 1))[:4], period_ms]
    with pytest.raises(ProtocolError) as caught:
        codec.decode(codec.encode(Frame(Kind.HEARTBEAT, ORIGIN, EPOCH, 0, body)))
    assert caught.value.reason == "malformed"


def test_a_heartbeat_of_the_previous_protocol_version_is_rejected_as_such(codec: Codec) -> None:
    # Version 1 heartbeats had no period: a mixed fleet fails loudly, never half-works.
    data = bytearray(codec.encode(Frame(Kind.HEARTBEAT, ORIGIN, EPOCH, 0, ["", 1, [], False, 0])))
    data[1] = 1
    with pytest.raises(ProtocolError) as caught:
        codec.decode(bytes(data))
    assert caught.value.reason == "unknown_version"


def bye(epoch: int = EPOCH, seq: int = 4) -> Frame:
    return Frame(Kind.BYE, ORIGIN, epoch, seq, protocol.stamped(12, None))


def test_bye_round_trips(codec: Codec) -> None:
    frame = codec.decode(codec.encode(bye()))
    assert frame == Frame(Kind.BYE, ORIGIN, EPOCH, 4, Stamped(12, None))


def test_stats_request_round_trips(codec: Codec) -> None:
    body = protocol.stamped(5, [77, "10.0.0.1:7935"])
    frame = codec.decode(codec.encode(Frame(Kind.STATS_REQUEST, ORIGIN, EPOCH, 0, body)))
    request = protocol.StatsRequest(77, "10.0.0.1:7935")
    assert frame == Frame(Kind.STATS_REQUEST, ORIGIN, EPOCH, 0, Stamped(5, request))


@pytest.mark.parametrize(
    "kind", [Kind.BYE, Kind.STATS_REQUEST, Kind.STATS_REPLY, Kind.BYE_ACK], ids=lambda k: k.name
)
@pytest.mark.parametrize("body", [None, 77, [1], [1.5, None], ["1", None], [True, None]])
def test_a_control_frame_without_its_stamp_is_malformed(
    codec: Codec, kind: Kind, body: object
) -> None:
    with pytest.raises(ProtocolError) as raised:
        codec.decode(codec.encode(Frame(kind, ORIGIN, EPOCH, 0, body)))
    assert raised.value.reason == "malformed"


def test_stats_reply_round_trips(codec: Codec) -> None:
    reply = StatsReply(
        request_id=77,
        requester=b"R" * NODE_ID_SIZE,
        stats={"hits": 10, "ratio": 0.5, "peers": ["a:1", "b:2"], "nested": {"x": None}},
    )
    body = protocol.stats_reply_body(reply)
    assert body == [77, b"R" * NODE_ID_SIZE, reply.stats]
    stamped = protocol.stamped(9, body)
    frame = codec.decode(codec.encode(Frame(Kind.STATS_REPLY, ORIGIN, EPOCH, 2, stamped)))
    assert frame == Frame(Kind.STATS_REPLY, ORIGIN, EPOCH, 2, Stamped(9, reply))


@pytest.mark.parametrize("number", [0, 1, 255, 256, 1 << 32, MAX_U64])
def test_epoch_and_seq_survive_the_whole_unsigned_range(codec: Codec, number: int) -> None:
    frame = codec.decode(codec.encode(bye(number, number)))
    assert (frame.epoch, frame.seq) == (number, number)


def test_encoding_is_deterministic_and_keyed(codec: Codec) -> None:
    frame = Frame(Kind.BYE, ORIGIN, EPOCH, 1)
    assert codec.encode(frame) == codec.encode(frame) == Codec(KEY).encode(frame)
    other = Codec(OTHER_KEY).encode(frame)
    assert other[:-TAG_SIZE] == codec.encode(frame)[:-TAG_SIZE]
    assert other[-TAG_SIZE:] != codec.encode(frame)[-TAG_SIZE:]


def test_wire_format_is_payload_then_truncated_hmac_sha256(codec: Codec) -> None:
    body = protocol.ops_body([Op("default", OpCode.CLEAR, None)])
    data = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 5, body))
    payload = pack([VERSION, int(Kind.INVALIDATE), ORIGIN, EPOCH, 5, body])
    assert data == sign(payload)
    assert len(data) == len(payload) + TAG_SIZE


def test_one_short_invalidation_is_small(codec: Codec) -> None:
    body = protocol.ops_body([Op("default", OpCode.DELETE, [":1:user:42"])])
    data = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, body))
    assert len(data) < 100
    assert len(data) <= FRAME_OVERHEAD + len(pack(body))


def test_frame_overhead_bounds_the_largest_header(codec: Codec) -> None:
    data = codec.encode(Frame(Kind.STATS_REPLY, ORIGIN, MAX_U64, MAX_U64, None))
    assert len(data) == FRAME_OVERHEAD + len(pack(None))


def test_short_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Codec(b"x" * 15)
    Codec(b"x" * 16)  # the minimum is accepted


# --- digest -----------------------------------------------------------------------------------


def test_digest_is_blake2b_of_stored_bytes_that_hold_no_set() -> None:
    assert protocol.digest(b"value") == hashlib.blake2b(b"value", digest_size=8).digest()
    assert len(protocol.digest(b"")) == DIGEST_SIZE
    assert protocol.digest(b"value") == protocol.digest(b"value")
    assert protocol.digest(b"value") != protocol.digest(b"valuf")


def _digests_under_hash_seed(seed: str) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.digestproc"],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, list[str]] = json.loads(result.stdout)
    return report


def test_equal_values_holding_sets_have_one_digest_whatever_the_hash_seed() -> None:
    """A value filled on two processes must not make each other's copy look stale."""
    seeds = [_digests_under_hash_seed(seed) for seed in ("1", "2", "3")]
    here = MeshCache(f"test-protocol-digest-{os.getpid()}", {})
    held = digestproc.stored(here)
    for name, data in held.items():
        pickles = {report[name][0] for report in seeds}
        # The seeds did change the pickles (the sets' order), so the digest had work to do.
        assert len(pickles) > 1, name
        assert {report[name][1] for report in seeds} == {protocol.digest(data).hex()}, name
    # So this process, as a peer, keeps its own copies when another one writes equal values.
    writer = seeds[0]
    keys = {name: here.make_key(f"value{index}") for index, name in enumerate(held)}
    unless = [[keys[name], bytes.fromhex(writer[name][1])] for name in held]
    here._store.apply([Op(here._location, OpCode.DELETE_UNLESS, unless)])
    for index, (name, value) in enumerate(digestproc.VALUES.items()):
        assert here.get(f"value{index}") == value, name


def test_dict_order_is_part_of_the_value() -> None:
    # Unlike a set's, a dict's order survives pickling and shows (iteration, JSON, templates):
    # a write that only reorders a dict must still evict the peers' copies.
    first = pickle.dumps({"a": 1, "b": {"x"}}, pickle.HIGHEST_PROTOCOL)
    reordered = pickle.dumps({"b": {"x"}, "a": 1}, pickle.HIGHEST_PROTOCOL)
    assert protocol.digest(first) != protocol.digest(reordered)


def test_unequal_sets_have_different_digests() -> None:
    def of(value: Any) -> bytes:
        return protocol.digest(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))

    assert of({"a", "b"}) != of({"a", "c"})
    assert of({"a", "b"}) != of(frozenset({"a", "b"}))
    assert of({1, 2}) != of({1.0, 2.0})  # equal for ==, not the same value to a reader
    assert of([{"a", "b"}, {"c"}]) != of([{"a"}, {"b", "c"}])


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(
            pickle.dumps([{"big", "set"}, "x" * protocol.CANONICAL_LIMIT], 5), id="over-the-limit"
        ),
        pytest.param(pickle.dumps({"old", "protocol"}, 3), id="protocol-3"),
        pytest.param(b"\x80\x05\x8f\x94(not a pickle", id="not-a-pickle"),
    ],
)
def test_digest_falls_back_to_the_stored_bytes(stored: bytes) -> None:
    """Where docs/consistency.md says the digest is the stored bytes' after all."""
    assert protocol.digest(stored) == hashlib.blake2b(stored, digest_size=DIGEST_SIZE).digest()


def test_digest_passes_delete_unless_validation(codec: Codec) -> None:
    op = Op("default", OpCode.DELETE_UNLESS, [["k", protocol.digest(b"x" * 10_000)]])
    data = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, protocol.ops_body([op])))
    assert codec.decode(data).body == [op]


# --- Rejections -------------------------------------------------------------------------------


def test_wrong_key_is_bad_mac(codec: Codec) -> None:
    data = Codec(OTHER_KEY).encode(Frame(Kind.BYE, ORIGIN, EPOCH, 1))
    assert reason_of(codec, data) == "bad_mac"


@pytest.mark.parametrize("position", [0, 1, 5, -TAG_SIZE - 1, -TAG_SIZE, -1])
def test_flipped_byte_is_bad_mac(codec: Codec, position: int) -> None:
    data = bytearray(valid_frame(codec))
    data[position] ^= 0x80
    assert reason_of(codec, bytes(data)) == "bad_mac"


def test_stranger_bytes_never_reach_msgpack(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unauthenticated bytes were parsed")

    forged = Codec(OTHER_KEY).encode(Frame(Kind.BYE, ORIGIN, EPOCH, 1))
    monkeypatch.setattr(msgpack, "unpackb", refuse)
    assert reason_of(codec, forged) == "bad_mac"


def test_too_large_on_decode() -> None:
    small = Codec(KEY, max_frame_bytes=64)
    data = Codec(KEY).encode(
        Frame(
            Kind.INVALIDATE,
            ORIGIN,
            EPOCH,
            1,
            protocol.ops_body([Op("a", OpCode.DELETE, ["k" * 40])]),
        )
    )
    assert len(data) > 64
    assert reason_of(small, data) == "too_large"
    assert reason_of(small, data[:64] + b"\x00") == "too_large"


def test_exactly_max_frame_bytes_is_accepted() -> None:
    data = Codec(KEY).encode(bye())
    assert Codec(KEY, max_frame_bytes=len(data)).decode(data).kind is Kind.BYE
    assert reason_of(Codec(KEY, max_frame_bytes=len(data) - 1), data) == "too_large"


def test_too_large_on_encode() -> None:
    small = Codec(KEY, max_frame_bytes=100)
    body = protocol.ops_body([Op("default", OpCode.DELETE, ["k" * 200])])
    with pytest.raises(ProtocolError) as info:
        small.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, body))
    assert info.value.reason == "too_large"
    assert "100" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"\x96", b"\x96\x01" + b"\x00" * 21])
def test_too_short_is_malformed(codec: Codec, data: bytes) -> None:
    assert reason_of(codec, data) == "malformed"


@pytest.mark.parametrize("version", [0, 1, 3, 127])
def test_unknown_version_is_reported_before_the_mac(codec: Codec, version: int) -> None:
    # A node on another protocol version is counted as such even if its key differs too.
    data = sign(pack([version, 1, ORIGIN, EPOCH, 1, None]), OTHER_KEY)
    assert reason_of(codec, data) == "unknown_version"


@pytest.mark.parametrize("version", [1, 3, 200, 70_000, -1, "2", None, [2]])
def test_unknown_version_with_valid_mac(codec: Codec, version: object) -> None:
    assert reason_of(codec, signed_fields(None, version=version, kind=3)) == "unknown_version"


def test_version_in_a_long_encoding_is_checked_after_the_mac(codec: Codec) -> None:
    # Version 3 as msgpack uint8 slips past the one-byte pre-check, so the MAC is checked first.
    rest = pack(3) + pack(ORIGIN) + pack(EPOCH) + pack(1) + pack(None)
    assert reason_of(codec, sign(b"\x96\xcc\x03" + rest)) == "unknown_version"
    assert reason_of(codec, sign(b"\x96\xcc\x02" + rest, OTHER_KEY)) == "bad_mac"


def test_problem_detail_is_in_the_message(codec: Codec) -> None:
    with pytest.raises(ProtocolError, match=r"^malformed: origin$"):
        codec.decode(signed_fields(None, kind=3, origin=b"short"))
    assert str(ProtocolError("bad_mac")) == "bad_mac"
    assert isinstance(ProtocolError("x"), ValueError)


MALFORMED_FRAMES: dict[str, bytes] = {
    # Envelope.
    "not msgpack": sign(b"\xc1" * 30),
    "truncated msgpack": sign(pack([VERSION, 3, ORIGIN, EPOCH, 1, None])[:-3]),
    "trailing data": sign(pack([VERSION, 3, ORIGIN, EPOCH, 1, None]) + b"\xc0"),
    "not an array": sign(pack({"version": 1, "kind": 3, "origin": ORIGIN, "e": 1, "s": 1})),
    "5 fields": sign(pack([1, 3, ORIGIN, EPOCH, 1])),
    "7 fields": sign(pack([1, 3, ORIGIN, EPOCH, 1, None, None])),
    "int map keys": signed_fields([1, ORIGIN, {1: 2}], kind=5),
    "deep nesting": sign(b"\x91" * 5000 + b"\xc0" + b"\x00" * 8),
    "kind 0": signed_fields(None, kind=0),
    "kind 6": signed_fields(None, kind=6),
    "kind str": signed_fields(None, kind="BYE"),
    "kind list": signed_fields(None, kind=[3]),
    "kind map": signed_fields(None, kind={"k": 3}),
    "kind bool": signed_fields(None, kind=True),
    "kind float": signed_fields(None, kind=3.0),
    "origin str": signed_fields(None, kind=3, origin="12345678"),
    "origin short": signed_fields(None, kind=3, origin=b"1234567"),
    "origin long": signed_fields(None, kind=3, origin=b"123456789"),
    "origin none": signed_fields(None, kind=3, origin=None),
    "epoch negative": signed_fields(None, kind=3, epoch=-1),
    "epoch float": signed_fields(None, kind=3, epoch=1.0),
    "epoch bool": signed_fields(None, kind=3, epoch=True),
    "epoch str": signed_fields(None, kind=3, epoch="1"),
    "seq negative": signed_fields(None, kind=3, seq=-5),
    "seq float": signed_fields(None, kind=3, seq=2.5),
    "seq none": signed_fields(None, kind=3, seq=None),
    # INVALIDATE bodies.
    "ops none": signed_fields(None),
    "ops empty": signed_fields([]),
    "ops str": signed_fields("delete"),
    "op not a list": signed_fields(["default"]),
    "op two items": signed_fields([["default", 1]]),
    "op four items": signed_fields([["default", 1, ["k"], None]]),
    "alias not str": signed_fields([[1, 1, ["k"]]]),
    "alias bytes": signed_fields([[b"default", 1, ["k"]]]),
    "opcode 0": signed_fields([["default", 0, ["k"]]]),
    "opcode 9": signed_fields([["default", 9, ["k"]]]),
    "opcode str": signed_fields([["default", "DELETE", ["k"]]]),
    "opcode list": signed_fields([["default", [1], ["k"]]]),
    "opcode bool": signed_fields([["default", True, ["k"]]]),
    "opcode float": signed_fields([["default", 1.0, ["k"]]]),
    "delete str": signed_fields([["default", 1, "k"]]),
    "delete none": signed_fields([["default", 1, None]]),
    "delete int key": signed_fields([["default", 1, ["k", 1]]]),
    "delete bytes key": signed_fields([["default", 1, [b"k"]]]),
    "unless flat": signed_fields([["default", 2, ["k", b"12345678"]]]),
    "unless short digest": signed_fields([["default", 2, [["k", b"1234567"]]]]),
    "unless str digest": signed_fields([["default", 2, [["k", "12345678"]]]]),
    "unless int key": signed_fields([["default", 2, [[1, b"12345678"]]]]),
    "unless triple": signed_fields([["default", 2, [["k", b"12345678", 1]]]]),
    "unless none": signed_fields([["default", 2, None]]),
    "clear args": signed_fields([["default", 3, []]]),
    "pattern list": signed_fields([["default", 4, ["a*"]]]),
    "pattern none": signed_fields([["default", 4, None]]),
    "tags str": signed_fields([["default", 5, "tag"]]),
    "tags none item": signed_fields([["default", 5, [None]]]),
    "good op then bad op": signed_fields([["default", 3, None], ["default", 1, "k"]]),
    # HEARTBEAT bodies.
    "heartbeat none": signed_fields(None, kind=2),
    "heartbeat 3 fields": signed_fields(["a:1", 1, []], kind=2),
    "heartbeat 5 fields": signed_fields(["a:1", 1, [], False, None], kind=2),
    "heartbeat address int": signed_fields([1, 1, [], False], kind=2),
    "heartbeat address bytes": signed_fields([b"a:1", 1, [], False], kind=2),
    "heartbeat sent float": signed_fields(["a:1", 1.0, [], False], kind=2),
    "heartbeat observer int": signed_fields(["a:1", 1, [], 0], kind=2),
    "heartbeat echo none": signed_fields(["a:1", 1, None, False], kind=2),
    "heartbeat echo map": signed_fields(["a:1", 1, {"a": 1}, False], kind=2),
    "heartbeat echo flat": signed_fields(["a:1", 1, [ORIGIN, 1, 2], False], kind=2),
    "heartbeat echo short": signed_fields(["a:1", 1, [[ORIGIN, 1]], False], kind=2),
    "heartbeat echo id size": signed_fields(["a:1", 1, [[b"1234567", 1, 2]], False], kind=2),
    "heartbeat echo id str": signed_fields(["a:1", 1, [["12345678", 1, 2]], False], kind=2),
    "heartbeat echo float": signed_fields(["a:1", 1, [[ORIGIN, 1, 2.0]], False], kind=2),
    "heartbeat echo bool": signed_fields(["a:1", 1, [[ORIGIN, True, 2]], False], kind=2),
    # BYE and STATS bodies.
    "bye with body": signed_fields(0, kind=3),
    "bye with list": signed_fields([], kind=3),
    "stats request none": signed_fields(None, kind=4),
    "stats request str": signed_fields("1", kind=4),
    "stats request bool": signed_fields(True, kind=4),
    "stats request float": signed_fields(1.0, kind=4),
    "stats reply none": signed_fields(None, kind=5),
    "stats reply short": signed_fields([1, ORIGIN], kind=5),
    "stats reply id str": signed_fields(["1", ORIGIN, {}], kind=5),
    "stats reply requester str": signed_fields([1, "requester", {}], kind=5),
    "stats reply stats list": signed_fields([1, ORIGIN, []], kind=5),
}


@pytest.mark.parametrize("data", MALFORMED_FRAMES.values(), ids=MALFORMED_FRAMES.keys())
def test_malformed_with_valid_mac(codec: Codec, data: bytes) -> None:
    assert len(data) >= 8 + TAG_SIZE  # so it is the content, not the length, that is wrong
    assert reason_of(codec, data) == "malformed"


def test_signed_garbage_is_malformed_not_bad_mac(codec: Codec) -> None:
    # The same garbage under another key is a forgery, not a parse failure.
    garbage = b"\xc1" * 30
    assert reason_of(codec, sign(garbage)) == "malformed"
    assert reason_of(codec, sign(garbage, OTHER_KEY)) == "bad_mac"


# --- split_ops --------------------------------------------------------------------------------


def op_size(op: Op) -> int:
    return len(pack([op.location, int(op.code), op.args]))


def flatten(groups: list[list[Op]]) -> list[tuple[str, OpCode, Any]]:
    """Each (alias, code, item) in order: what the receiver ends up applying."""
    out: list[tuple[str, OpCode, Any]] = []
    for group in groups:
        for op in group:
            items = op.args if isinstance(op.args, list) else [op.args]
            out.extend((op.location, op.code, item) for item in items)
    return out


def test_split_ops_of_nothing_is_no_frames() -> None:
    assert protocol.split_ops([], 1000) == []


def test_split_ops_keeps_small_ops_in_one_frame() -> None:
    assert protocol.split_ops(ALL_OPS, 10_000) == [ALL_OPS]


def test_split_ops_starts_a_new_frame_when_the_budget_is_spent() -> None:
    ops = [Op("default", OpCode.PATTERN, f"{i:040d}") for i in range(10)]
    size = op_size(ops[0])
    groups = protocol.split_ops(ops, 3 * size)
    assert groups == [ops[0:3], ops[3:6], ops[6:9], ops[9:10]]


def test_split_ops_splits_one_large_op_by_keys() -> None:
    keys = [f":1:user:{i:06d}" for i in range(1000)]
    op = Op("default", OpCode.DELETE, keys)
    budget = 2000
    assert op_size(op) > budget
    groups = protocol.split_ops([op], budget)
    assert len(groups) > 1
    assert flatten(groups) == [("default", OpCode.DELETE, key) for key in keys]
    for group in groups:
        assert sum(op_size(piece) for piece in group) <= budget
        assert all(piece.location == "default" and piece.code is OpCode.DELETE for piece in group)


def test_split_ops_fills_its_frames() -> None:
    keys = [f":1:user:{i:06d}" for i in range(20_000)]
    op = Op("default", OpCode.DELETE, keys)
    budget = 16 * 1024
    groups = protocol.split_ops([op], budget)
    # Nearly full frames: the op's size over the budget, plus a frame of slack.
    assert len(groups) <= op_size(op) // budget + 2
    assert flatten(groups) == [("default", OpCode.DELETE, key) for key in keys]


def test_split_ops_pieces_are_valid_frames(codec: Codec) -> None:
    keys = [f"k{i}" for i in range(500)]
    pairs = [[key, protocol.digest(key.encode())] for key in keys]
    ops = [Op("a", OpCode.DELETE_UNLESS, pairs), Op("a", OpCode.TAGS, keys)]
    groups = protocol.split_ops(ops, 1024)
    decoded: list[Op] = []
    for group in groups:
        data = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, protocol.ops_body(group)))
        assert len(data) <= FRAME_OVERHEAD + 1024 + 5
        decoded.extend(codec.decode(data).body)
    assert flatten([decoded]) == flatten([ops])


def test_split_ops_leaves_an_oversized_key_alone_in_its_frame() -> None:
    huge = "x" * 5000
    ops = [
        Op("default", OpCode.DELETE, ["a"]),
        Op("default", OpCode.DELETE, [huge]),
        Op("default", OpCode.DELETE, ["b"]),
    ]
    groups = protocol.split_ops(ops, 1000)
    assert groups == [[ops[0]], [ops[1]], [ops[2]]]


def test_split_ops_never_splits_a_pattern() -> None:
    op = Op("default", OpCode.PATTERN, "p" * 3000)
    assert protocol.split_ops([op], 100) == [[op]]


# --- Extension types --------------------------------------------------------------------------

# A STATS_REPLY envelope up to its body, so bodies can be spliced in as raw msgpack.
HEADER = b"\x96" + pack(VERSION) + pack(int(Kind.STATS_REPLY)) + pack(ORIGIN) + pack(EPOCH)
HEADER += pack(1)


@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\xff\x00",  # timestamp (ext -1) of 1 byte
        b"\xd7\xff" + b"\xff" * 8,  # 64-bit timestamp, nanoseconds out of range
        b"\xc7\x0c\xff" + b"\xff" * 12,  # 96-bit timestamp, nanoseconds out of range
        b"\xc7\x05\xff" + b"\x00" * 5,  # timestamp of 5 bytes
        b"\xc7\x05",  # ext header cut short
    ],
)
def test_bad_extension_values_in_the_body_are_malformed(codec: Codec, ext: bytes) -> None:
    payload = HEADER + b"\x93\x01" + pack(ORIGIN) + b"\x81\xa1k" + ext
    assert reason_of(codec, sign(payload)) == "malformed"
    assert reason_of(codec, sign(HEADER + ext)) == "malformed"


def test_stats_may_carry_extension_values(codec: Codec) -> None:
    # Stats are free-form: well-formed extension values pass through untouched.
    timestamp = b"\xd6\xff\x00\x00\x00\x01"
    ext = pack(msgpack.ExtType(5, b"xy"))
    reply = b"\x93\x01" + pack(ORIGIN) + b"\x82\xa1t" + timestamp + b"\xa1e" + ext
    frame = codec.decode(sign(HEADER + b"\x92\x07" + reply))
    assert frame.body == Stamped(
        7, StatsReply(1, ORIGIN, {"t": msgpack.Timestamp(1), "e": msgpack.ExtType(5, b"xy")})
    )
    # ...but an extension value is never a valid body for a kind with a fixed shape.
    assert reason_of(codec, sign(HEADER + timestamp)) == "malformed"


# --- Property tests ---------------------------------------------------------------------------

keys = st.text(min_size=1, max_size=30)
aliases = st.text(min_size=1, max_size=20)
u64 = st.integers(min_value=0, max_value=MAX_U64)
origins = st.binary(min_size=NODE_ID_SIZE, max_size=NODE_ID_SIZE)
digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)

ops_strategy = st.one_of(
    st.builds(Op, aliases, st.just(OpCode.DELETE), st.lists(keys, max_size=6)),
    st.builds(
        Op,
        aliases,
        st.just(OpCode.DELETE_UNLESS),
        st.lists(st.tuples(keys, digests).map(list), max_size=6),
    ),
    st.builds(Op, aliases, st.just(OpCode.CLEAR), st.none()),
    st.builds(Op, aliases, st.just(OpCode.PATTERN), st.text(max_size=30)),
    st.builds(Op, aliases, st.just(OpCode.TAGS), st.lists(keys, max_size=6)),
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=MAX_U64)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
)
msgpack_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6), children, max_size=3)
        | st.dictionaries(st.integers(-3, 3), children, min_size=1, max_size=2)
    ),
    max_leaves=8,
)


@FUZZ
@given(ops=st.lists(ops_strategy, min_size=1, max_size=4), origin=origins, epoch=u64, seq=u64)
def test_invalidate_round_trip_property(ops: list[Op], origin: bytes, epoch: int, seq: int) -> None:
    codec = Codec(KEY)
    body = protocol.ops_body(ops)
    data = codec.encode(Frame(Kind.INVALIDATE, origin, epoch, seq, body))
    assert len(data) <= FRAME_OVERHEAD + len(pack(body))
    assert codec.decode(data) == Frame(Kind.INVALIDATE, origin, epoch, seq, ops)


@FUZZ
@given(
    heartbeat=st.builds(
        Heartbeat,
        st.text(max_size=40),
        st.integers(min_value=-(1 << 63), max_value=MAX_U64),
        st.lists(st.tuples(origins, u64, u64), max_size=4).map(tuple),
        st.booleans(),
    ),
    epoch=u64,
    seq=u64,
)
def test_heartbeat_round_trip_property(heartbeat: Heartbeat, epoch: int, seq: int) -> None:
    codec = Codec(KEY)
    body = protocol.heartbeat_body(heartbeat)
    frame = codec.decode(codec.encode(Frame(Kind.HEARTBEAT, ORIGIN, epoch, seq, body)))
    assert frame == Frame(Kind.HEARTBEAT, ORIGIN, epoch, seq, heartbeat)


@FUZZ
@given(ops=st.lists(ops_strategy, max_size=8), budget=st.integers(min_value=256, max_value=800))
def test_split_ops_property(ops: list[Op], budget: int) -> None:
    groups = protocol.split_ops(ops, budget)
    assert all(groups), "no empty frames"
    assert flatten(groups) == flatten([ops])
    for group in groups:
        total = sum(op_size(op) for op in group)
        if total > budget:
            # Only an op that cannot be made smaller may exceed the budget, and it goes alone.
            (piece,) = group
            assert not isinstance(piece.args, list) or len(piece.args) == 1


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    codec = Codec(KEY, max_frame_bytes=150)
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    assert info.value.reason in REASONS


@FUZZ
@given(payload=st.binary(max_size=200))
def test_signed_random_bytes_only_raise_protocol_error(payload: bytes) -> None:
    result = outcome(Codec(KEY), sign(payload))
    if isinstance(result, str):
        assert result in {"malformed", "unknown_version"}
    else:
        assert isinstance(result, Frame)


@FUZZ
@given(value=msgpack_values)
def test_signed_arbitrary_msgpack_only_raises_protocol_error(value: object) -> None:
    codec = Codec(KEY)
    with pytest.raises(ProtocolError) as info:
        codec.decode(sign(pack(value) + b"\x00" * 24))  # trailing bytes are never accepted
    assert info.value.reason in {"malformed", "unknown_version"}
    result = outcome(codec, sign(pack(value)))
    if isinstance(result, str):
        assert result in {"malformed", "unknown_version"}
    else:
        assert isinstance(result, Frame)


@FUZZ
@given(
    version=st.sampled_from([VERSION, VERSION, 0, 2, 200, -1, "1", None, 1.0]),
    kind=st.integers(-1, 7) | scalars,
    origin=origins | scalars,
    epoch=u64 | scalars,
    seq=u64 | scalars,
    body=msgpack_values,
)
def test_signed_arbitrary_fields_only_raise_protocol_error(
    version: object, kind: object, origin: object, epoch: object, seq: object, body: object
) -> None:
    result = outcome(Codec(KEY), sign(pack([version, kind, origin, epoch, seq, body])))
    if isinstance(result, str):
        assert result in {"malformed", "unknown_version"}
    else:
        assert isinstance(result.kind, Kind)
        assert isinstance(result.origin, bytes)
        assert len(result.origin) == NODE_ID_SIZE
        assert type(result.epoch) is int
        assert type(result.seq) is int


@FUZZ
@given(
    kind=st.sampled_from(list(Kind)),
    body=st.one_of(
        st.lists(st.tuples(aliases, st.integers(0, 6), msgpack_values).map(list), max_size=3),
        st.tuples(st.text(max_size=5), u64, msgpack_values, st.booleans()).map(list),
        st.tuples(u64, st.binary(max_size=10), msgpack_values).map(list),
    ),
)
def test_signed_near_valid_bodies_only_raise_protocol_error(kind: Kind, body: object) -> None:
    result = outcome(Codec(KEY), sign(pack([VERSION, int(kind), ORIGIN, EPOCH, 1, body])))
    if isinstance(result, str):
        assert result == "malformed"
    else:
        assert result.kind is kind


@FUZZ
@given(kind=st.sampled_from(list(Kind)), body=st.binary(min_size=1, max_size=60))
def test_signed_raw_body_bytes_only_raise_protocol_error(kind: Kind, body: bytes) -> None:
    header = HEADER[:2] + pack(int(kind)) + HEADER[3:]
    result = outcome(Codec(KEY), sign(header + body))
    if isinstance(result, str):
        assert result == "malformed"
    else:
        assert result.kind is kind


@FUZZ
@given(
    ops=st.lists(ops_strategy, min_size=1, max_size=3),
    position=st.integers(min_value=0),
    bit=st.integers(0, 7),
    cut=st.integers(min_value=0),
    extra=st.binary(min_size=1, max_size=40),
)
def test_damaged_frames_are_always_rejected(
    ops: list[Op], position: int, bit: int, cut: int, extra: bytes
) -> None:
    codec = Codec(KEY)
    frame = codec.encode(Frame(Kind.INVALIDATE, ORIGIN, EPOCH, 1, protocol.ops_body(ops)))
    assert codec.decode(frame).body == ops

    position %= len(frame)
    flipped = bytearray(frame)
    flipped[position] ^= 1 << bit
    # Only a flip in the version byte can look like another version; the rest is a bad tag.
    expected = {"bad_mac", "unknown_version"} if position == 1 else {"bad_mac"}
    assert reason_of(codec, bytes(flipped)) in expected

    cut %= len(frame)
    assert reason_of(codec, frame[:cut]) == ("malformed" if cut < 8 + TAG_SIZE else "bad_mac")

    assert reason_of(codec, frame + extra) == "bad_mac"
    assert reason_of(codec, extra + frame) in {"bad_mac", "unknown_version"}


@FUZZ
@given(key=st.binary(min_size=16, max_size=64), seq=u64)
def test_any_other_key_is_bad_mac(key: bytes, seq: int) -> None:
    data = Codec(key).encode(Frame(Kind.BYE, ORIGIN, EPOCH, seq))
    if key == KEY:
        assert Codec(KEY).decode(data).seq == seq
    else:
        assert reason_of(Codec(KEY), data) == "bad_mac"
