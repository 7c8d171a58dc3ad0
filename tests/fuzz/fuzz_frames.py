"""Coverage-guided fuzzing of the frame decoder with atheris (``pip install atheris``).

    .venv/bin/python -m tests.fuzz.fuzz_frames tests/fuzz/corpus -max_total_time=60
    .venv/bin/python -m tests.fuzz.fuzz_frames --make-corpus     # (re)write the seed corpus

The first input byte picks the door: odd, the bytes go to ``Codec.decode`` as they are (what a
stranger can send: the MAC check must stop everything); even, they are signed with the key first
(what a peer holding the secret can send: the parser behind the MAC). Either way, anything but
``ProtocolError`` escaping is a crash. ``tests/test_fuzz_corpus.py`` replays the corpus on every
test run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

KEY = b"fuzzing-key-not-a-secret-32bytes"
CORPUS = Path(__file__).parent / "corpus"


class Harness:
    def __init__(self, protocol: ModuleType) -> None:
        self.protocol = protocol
        self.codec = protocol.Codec(KEY, max_frame_bytes=64 * 1024)

    def one_input(self, data: bytes) -> None:
        if not data:
            return
        body = data[1:]
        if not data[0] & 1:
            body += self.codec._tag(body)
        with contextlib.suppress(self.protocol.ProtocolError):
            self.codec.decode(body)

    def seed_corpus(self) -> dict[str, bytes]:
        p = self.protocol
        origin, epoch = b"\x01" * p.NODE_ID_SIZE, 1_700_000_000_000
        ops = [
            p.Op("default", p.OpCode.DELETE, [":1:a", ":1:b"]),
            p.Op("default", p.OpCode.DELETE_UNLESS, [[":1:c", p.digest(b"v")]]),
            p.Op("other", p.OpCode.CLEAR, None),
            p.Op("default", p.OpCode.PATTERN, ":1:user:*"),
            p.Op("default", p.OpCode.TAGS, ["t:shop_product", "r:shop_product:1"]),
        ]
        heartbeat = p.Heartbeat("10.0.0.1:7934", 123, ((origin, 1, 2),), False)
        frames: dict[str, Any] = {
            "invalidate": p.Frame(p.Kind.INVALIDATE, origin, epoch, 7, p.ops_body(ops)),
            "heartbeat": p.Frame(p.Kind.HEARTBEAT, origin, epoch, 7, p.heartbeat_body(heartbeat)),
            "bye": p.Frame(p.Kind.BYE, origin, epoch, 7, p.stamped(124, None)),
        }
        corpus = {}
        for name, frame in frames.items():
            encoded = self.codec.encode(frame)
            corpus[f"{name}-raw"] = b"\x01" + encoded  # through the MAC gate, valid
            corpus[f"{name}-signed"] = b"\x00" + encoded[: -p.TAG_SIZE]  # behind it
        return corpus


def main() -> None:
    if "--make-corpus" in sys.argv:
        from django_warpmesh import protocol

        CORPUS.mkdir(exist_ok=True)
        for name, data in Harness(protocol).seed_corpus().items():
            (CORPUS / name).write_bytes(data)
        return
    import atheris

    with atheris.instrument_imports(include=["django_warpmesh", "msgpack"]):
        from django_warpmesh import protocol
    atheris.Setup(sys.argv, Harness(protocol).one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
