"""Model writes in one process evict tagged entries in the others: real processes, shared DB."""

from __future__ import annotations

import pytest

from harness import wait_for
from tests.cluster import Cluster, MeshProcess, cluster

pytestmark = [pytest.mark.mesh, pytest.mark.database]


def applied_everywhere(mesh: Cluster, writer: MeshProcess) -> None:
    """Wait until every peer has received every invalidation ``writer`` has sent so far."""
    stats = writer.stats()
    sent, origin = stats["invalidations_sent"], stats["node_id"]

    def received(proc: MeshProcess) -> int:
        return sum(
            peer["invalidations_received"] for peer in proc.stats()["peers"] if peer["id"] == origin
        )

    wait_for(
        lambda: all(received(proc) >= sent for proc in mesh.procs if proc is not writer),
        5,
        message="the writer's invalidations to arrive",
    )


def test_a_model_saved_in_one_process_evicts_tagged_entries_everywhere(
    shared_db: dict[str, str],
) -> None:
    with cluster(3, env=shared_db) as mesh:
        mesh.wait_connected()
        a, b, c = mesh.procs
        first = a.request("create_product", name="first", price=10)
        second = a.request("create_product", name="second", price=20)
        applied_everywhere(mesh, a)  # the creations' own invalidations must not race the fills
        for proc in (b, c):
            proc.request("set_tagged", key="row-first", value=10, product=first)
            proc.request("set_tagged", key="row-second", value=20, product=second)
            proc.request("set_tagged", key="table", value=30, table=True)

        a.request("save_product", product=first, price=11)
        wait_for(
            lambda: not any(p.stored("row-first") or p.stored("table") for p in (b, c)),
            5,
            message="the saved row's entries to leave B and C",
        )
        assert b.stored("row-second")
        assert c.stored("row-second")

        b.request("update_products", price=1)  # no signal: the execute wrapper catches it
        wait_for(
            lambda: not any(p.stored("row-second") for p in (a, c)) and not b.stored("row-second"),
            5,
            message="a table-wide update to evict every row's entries",
        )
