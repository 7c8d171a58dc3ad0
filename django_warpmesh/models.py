from __future__ import annotations

from django.db import models


class Peer(models.Model):
    """One live mesh node, as it announced itself. Rows are managed by the nodes themselves."""

    node_id = models.CharField(max_length=32, unique=True)
    address = models.CharField(max_length=255)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    caches = models.JSONField(default=list)
    version = models.CharField(max_length=32)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "mesh peer"
        ordering = ["address"]

    def __str__(self) -> str:
        return f"{self.node_id} at {self.address}"
