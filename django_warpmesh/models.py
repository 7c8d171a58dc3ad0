from __future__ import annotations

from django.db import models


class PeerRow(models.Model):
    """A row of the peer table: one live mesh node, as it announced itself. Rows are managed by
    the nodes themselves (the node's own view of a peer is :class:`django_warpmesh.node.Peer`)."""

    node_id = models.CharField(max_length=32, unique=True)
    address = models.CharField(max_length=255)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    caches = models.JSONField(default=list)
    version = models.CharField(max_length=32)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "django_warpmesh_peer"  # the table every version of the nodes shares
        verbose_name = "mesh peer"
        ordering = ["address"]

    def __str__(self) -> str:
        return f"{self.node_id} at {self.address}"
