"""A read-only view of the peer table: rows belong to the nodes, not to people."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from django_warpmesh.conf import get_settings
from django_warpmesh.models import PeerRow

if TYPE_CHECKING:
    PeerAdminBase = admin.ModelAdmin[PeerRow]
else:
    # ModelAdmin is generic only in django-stubs, not at run time.
    PeerAdminBase = admin.ModelAdmin


@admin.register(PeerRow)
class PeerAdmin(PeerAdminBase):
    list_display = ["node_id", "address", "host", "pid", "last_seen", "age", "stale"]
    list_filter = ["host"]
    search_fields = ["node_id", "address", "host"]
    ordering = ["address"]

    @admin.display(description="age")
    def age(self, peer: PeerRow) -> str:
        seconds = int((timezone.now() - peer.started_at).total_seconds())
        return str(timedelta(seconds=max(seconds, 0)))

    @admin.display(description="stale", boolean=True)
    def stale(self, peer: PeerRow) -> bool:
        return timezone.now() - peer.last_seen > timedelta(seconds=get_settings().stale_after)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
