"""The report: docs/benchmarks.md (tables, targets, machine) and the latency plot (PNG)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Section, Table, Target

PLOT_NAME = "benchmarks-latency.png"


def server_versions() -> dict[str, str]:
    """Versions of the local servers the comparisons talk to (n/a when unreachable)."""
    versions = {"Redis": "n/a", "NATS": "n/a", "PostgreSQL": "n/a"}
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)
        versions["Redis"] = str(client.info("server")["redis_version"])
        client.close()
    with contextlib.suppress(Exception), socket.create_connection(("127.0.0.1", 4222), 2) as conn:
        # A NATS server greets every client with INFO {json}.
        greeting = conn.recv(4096).decode()
        versions["NATS"] = str(json.loads(greeting.split(" ", 1)[1])["version"])
    with contextlib.suppress(Exception):
        import psycopg

        from benchmarks.transport_compare import POSTGRESQL_URL

        with psycopg.connect(POSTGRESQL_URL, connect_timeout=2) as connection:
            row = connection.execute(
                "SELECT current_setting('server_version'), current_setting('max_connections')"
            ).fetchone()
            versions["PostgreSQL"] = f"{row[0]} (max_connections {row[1]})" if row else "n/a"
    return versions


def targets_table(sections: Sequence[Section]) -> Table:
    table = Table("Targets from the issue", ["§", "target", "this run", "status", "what limits it"])
    for section in sections:
        for target in section.targets:
            table.add(
                section.number,
                target.text,
                target.result,
                target.status,
                target.limit if target.met is False else "",
            )
    return table


def summary(targets: Sequence[Target]) -> str:
    met = sum(1 for target in targets if target.met)
    missed = sum(1 for target in targets if target.met is False)
    measured = sum(1 for target in targets if target.met is None and target.no_threshold)
    other = len(targets) - met - missed - measured
    counts = f"{met} met, {missed} missed"
    if measured:
        counts += f", {measured} measured with no threshold"
    return f"{counts}, {other} not measured"


def markdown(
    *,
    header: str,
    machine: dict[str, str],
    calibration: Table | None,
    sections: Sequence[Section],
    plot: str | None,
) -> str:
    facts = Table("Machine and versions", ["", ""])
    for name, value in machine.items():
        facts.add(name, value)
    parts = ["# Benchmarks\n", header.strip() + "\n", facts.markdown()]
    if calibration is not None:
        parts.append(calibration.markdown())
    targets = [target for section in sections for target in section.targets]
    parts += [f"## Targets: {summary(targets)}\n", targets_table(sections).markdown()]
    if plot:
        parts.append(f"![Latency distributions]({plot})\n")
    parts += [section.markdown() for section in sections]
    return "\n".join(parts)


def plot(sections: Sequence[Section], path: Path) -> bool:
    """CDFs of every latency sample, one panel per group; False if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups: dict[str, dict[str, list[float]]] = {}
    for section in sections:
        for name, samples in section.samples.items():
            group, _, label = name.partition("|")
            if samples:
                groups.setdefault(group, {})[label] = samples
    if not groups:
        return False
    columns = 2
    rows = (len(groups) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for axis, (group, series) in zip(axes.flat, groups.items(), strict=False):
        for label, samples in series.items():
            ordered = sorted(samples)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axis.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered)})")
        axis.set_xscale("log")
        low = min(min(samples) for samples in series.values())
        high = max(max(samples) for samples in series.values())
        # 1-2-5 ticks on a narrow range; decades only on a wide one, or the labels collide.
        subs = (1.0, 2.0, 5.0) if high / max(low, 1e-9) < 100 else (1.0,)
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=subs))
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(_microseconds))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_title(group)
        axis.set_xlabel("write → key gone on a receiver (log scale)")
        axis.set_ylabel("fraction of samples")
        axis.axvline(1000, color="grey", linestyle=":", linewidth=1)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small", loc="lower right")
    for axis in list(axes.flat)[len(groups) :]:
        axis.set_visible(False)
    figure.suptitle("django-warpmesh: invalidation latency (CDF; dotted line: 1 ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _microseconds(value: float, position: int) -> str:
    """Tick labels of a µs axis: 200 µs, 1 ms, 20 ms."""
    if value >= 1000:
        return f"{value / 1000:g} ms"
    return f"{value:g} µs"
