"""What this process runs under, as the checks need to know it: a pre-fork server, uWSGI."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from typing import Any


def prefork_server(environ: Mapping[str, str]) -> str | None:
    """What says a pre-fork server (gunicorn, uWSGI) may run several workers here, or None."""
    for name in ("WEB_CONCURRENCY", "UWSGI_PROCESSES", "UWSGI_WORKERS"):
        count = _as_int(environ.get(name))
        if count is not None and count > 1:
            return f"{name}={count}"
    gunicorn_args = environ.get("GUNICORN_CMD_ARGS")
    if gunicorn_args is not None:
        workers = _gunicorn_workers(gunicorn_args)
        if workers is None or workers > 1:
            return f"GUNICORN_CMD_ARGS={gunicorn_args!r}"
    software = environ.get("SERVER_SOFTWARE", "")
    if software.lower().startswith(("gunicorn", "uwsgi")):
        return f"SERVER_SOFTWARE={software!r}"
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None and (getattr(uwsgi, "numproc", 2) or 2) > 1:
        return "running under uWSGI"
    return None


def _gunicorn_workers(args: str) -> int | None:
    try:
        words = shlex.split(args)
    except ValueError:
        return None
    for index, word in enumerate(words):
        if word in {"-w", "--workers"} and index + 1 < len(words):
            return _as_int(words[index + 1])
        for prefix in ("--workers=", "-w"):
            if word.startswith(prefix) and len(word) > len(prefix):
                return _as_int(word[len(prefix) :])
    return None


def _as_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# Options that turn Python threads on in uWSGI before 2.0.27, whatever their value (even
# `threads = 1`): those flagged UWSGI_OPT_THREADS in its core and plugins.
UWSGI_THREADS_OPTIONS = frozenset(
    {
        "threads",
        "thread-stacksize",
        "thread-stack-size",
        "threads-stacksize",
        "threads-stack-size",
        "py-tracebacker",
        "py-auto-reload",
        "py-autoreload",
        "python-auto-reload",
        "python-autoreload",
        "py-auto-reload-ignore",
        "gevent",
        "asyncio",
        "tornado",
        "goroutines",
    }
)


def uwsgi_threads_enabled(uwsgi: Any) -> bool:
    """Whether the uWSGI running this process lets Python threads run besides the request's."""
    has_threads = getattr(uwsgi, "has_threads", None)
    if has_threads is not None:
        # uWSGI's own verdict after all its options and defaults (exported since 1.0).
        return bool(has_threads)
    # A `uwsgi` module without it: uWSGI's rule, from the options it was started with.
    if tuple(getattr(uwsgi, "version_info", ())[:3]) >= (2, 0, 27):
        return True  # always on since 2.0.27; `enable-threads` is a no-op there
    options = {_text(key): value for key, value in (getattr(uwsgi, "opt", None) or {}).items()}
    if not UWSGI_THREADS_OPTIONS.isdisjoint(options):
        return True
    return _uwsgi_true(options.get("enable-threads"))


def _uwsgi_true(value: object) -> bool:
    """A boolean option's value in `uwsgi.opt` the way uWSGI reads it (uwsgi_opt_true)."""
    if isinstance(value, list):  # given several times: the last one is applied last
        value = value[-1] if value else None
    if value is None:
        return False
    if value is True:  # a flag given without a value, e.g. `--enable-threads`
        return True
    return _text(value).lower() not in {"false", "off", "no", "0"}


def _text(value: object) -> str:
    # uWSGI exports option names as str but values as bytes under Python 3.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
