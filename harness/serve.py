"""The child's side of :class:`harness.process.JsonLinesProcess`: the request loop.

Imports nothing but the standard library: it runs in the processes under test and under
measurement, whose imports are theirs to decide.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

Handler = Callable[[dict[str, Any]], Any]


def serve(
    handle: Handler, hello: dict[str, Any] | None = None, *, tracebacks: bool = False
) -> None:
    """Say hello, then answer each JSON request line on stdin until stdin closes or after the
    ``{"call": "exit"}`` request has been answered.

    The hello line is ``{"ok": "hello", "pid": ...}`` and ``hello``'s fields. Each request gets
    one line: ``{"ok": handle(request)}``, or ``{"error": "Type: message"}`` if ``handle`` raised
    (with the traceback after it when ``tracebacks``: where a benchmark's function failed). A
    result JSON cannot hold is sent as its ``repr()``. ``handle`` does what ``exit`` needs done
    (stop the node); the loop ends after answering it, and the process exits when its caller
    returns.
    """
    print(json.dumps({"ok": "hello", "pid": os.getpid(), **(hello or {})}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"ok": handle(request)}
        except Exception as exc:
            detail = f"\n{traceback.format_exc()}" if tracebacks else ""
            reply = {"error": f"{type(exc).__name__}: {exc}{detail}"}
        print(json.dumps(reply, default=repr), flush=True)
        if request.get("call") == "exit":
            break
