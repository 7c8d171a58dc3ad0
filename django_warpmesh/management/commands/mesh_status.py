"""``manage.py mesh_status``: the health of the whole mesh, as its peers see it.

An observer (:mod:`django_warpmesh.observe`) asks every peer for its stats over the mesh; the
command prints the report (:mod:`django_warpmesh.status_report`): a table and a verdict, or
``--json``, once or every ``--watch`` seconds.

Exit status, usable as a probe: 0 healthy, 1 degraded, 2 disabled or misconfigured (including bad
arguments). Output keys (``--json``) are documented in docs/operations.md and kept stable.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_warpmesh.observe import Observer
from django_warpmesh.status_report import DISABLED, render_table

DEFAULT_TIMEOUT = 2.0
DEFAULT_WATCH = 2.0


def _positive_seconds(text: str) -> float:
    """argparse type: a bad value is a usage error (exit status 2; CommandError from code)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of seconds, got {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class Command(BaseCommand):
    help = (
        "Show the health of the whole mesh: every peer's connections, latency and counters, "
        "asked over the mesh by an observer that never joins it. Exit status: 0 healthy, "
        "1 degraded, 2 disabled or misconfigured."
    )
    # The command reports a missing peer table or a bad setting itself, with exit status 2;
    # the system checks would stop it first with another status.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            help="Machine-readable output (keys documented in docs/operations.md). With "
            "--watch, one JSON document per line.",
        )
        parser.add_argument(
            "--watch",
            nargs="?",
            const=DEFAULT_WATCH,
            default=None,
            type=_positive_seconds,
            metavar="SECONDS",
            help=f"Report again every SECONDS (default {DEFAULT_WATCH:g}) until interrupted.",
        )
        parser.add_argument(
            "--count",
            type=_positive_int,
            default=None,
            help="With --watch: stop after this many reports.",
        )
        parser.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="How long to wait for the peers to answer "
            f"(default {DEFAULT_TIMEOUT:g}). A peer that has not answered by then is shown as "
            "not answering.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["count"] is not None and options["watch"] is None:
            raise CommandError("--count only makes sense with --watch.", returncode=2)
        if options["verbosity"] < 2:
            # The observer's own node would log "connected to ..." for every peer it dials.
            logging.getLogger("django_warpmesh").setLevel(logging.WARNING)
        observer = Observer()
        code = DISABLED
        rounds = 0
        try:
            while True:
                report = observer.report(options["timeout"])
                code = report["exit_code"]
                self._print(report, options)
                rounds += 1
                if options["watch"] is None or rounds == options["count"]:
                    break
                time.sleep(options["watch"])
        except KeyboardInterrupt:
            if not rounds:
                raise
        finally:
            observer.close()
        if code:
            sys.exit(code)

    def _print(self, report: dict[str, Any], options: dict[str, Any]) -> None:
        if options["json"]:
            indent = None if options["watch"] is not None else 2
            self.stdout.write(json.dumps(report, indent=indent, sort_keys=False))
            self.stdout.flush()
            return
        if options["watch"] is not None and self.stdout.isatty():
            self.stdout.write("\x1b[H\x1b[2J", ending="")
        for line in render_table(report):
            self.stdout.write(line)
        style = {
            "healthy": self.style.SUCCESS,
            "degraded": self.style.WARNING,
        }.get(report["status"], self.style.ERROR)
        self.stdout.write(style(report["verdict"]))
        if options["watch"] is not None:
            self.stdout.write("")
        self.stdout.flush()
