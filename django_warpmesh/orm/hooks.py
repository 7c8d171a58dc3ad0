"""Connecting the hooks for the current settings, and disconnecting them.

Receivers are connected per watched model with ``sender=``, so models left out keep Django's
fast-delete path; the execute wrapper goes on every connection, those open already and those
made later.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, setting_changed
from django.db import connections
from django.db.backends.signals import connection_created
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from django_warpmesh.cache import add_store_guard
from django_warpmesh.conf import get_settings
from django_warpmesh.orm import watched
from django_warpmesh.orm.claims import _claim, _drop_all_claims
from django_warpmesh.orm.execute_wrapper import _on_connection_created, _wrap
from django_warpmesh.orm.receivers import _on_deleted, _on_m2m_changed, _on_saved
from django_warpmesh.orm.transactions import _uncommitted_by_this_thread
from django_warpmesh.orm.watched import selected_models, unknown_labels

_DISPATCH = "django_warpmesh.orm"


def install() -> None:
    """Connect the hooks for the current settings (again, if they changed). Idempotent.

    The app's ``ready()`` calls it; nothing is connected on import. Whatever the settings, and
    before it can find them invalid, it also has every later change of WARPMESH install the hooks
    again (``override_settings``), and the cache refuse to store a value tagged with what this
    thread wrote in a transaction still open.
    """
    setting_changed.connect(_reinstall, dispatch_uid=f"{_DISPATCH}.reinstall")
    add_store_guard(_uncommitted_by_this_thread)
    uninstall()
    config = get_settings()
    if not config.orm:
        return
    unknown = unknown_labels()
    if unknown:
        raise ImproperlyConfigured(
            f"WARPMESH['ORM_INCLUDE'/'ORM_EXCLUDE'] name no installed app or model: "
            f"{', '.join(unknown)}."
        )
    chosen = selected_models()
    registry = watched._build_registry(chosen)
    watched._registry = registry
    for model in chosen:
        uid = f"{_DISPATCH}.{model._meta.label}"
        pre_save.connect(_claim, sender=model, dispatch_uid=uid, weak=False)
        pre_delete.connect(_claim, sender=model, dispatch_uid=uid, weak=False)
        post_save.connect(_on_saved, sender=model, dispatch_uid=uid, weak=False)
        post_delete.connect(_on_deleted, sender=model, dispatch_uid=uid, weak=False)
    for through in registry.through:
        uid = f"{_DISPATCH}.{through._meta.label}"
        m2m_changed.connect(_on_m2m_changed, sender=through, dispatch_uid=uid, weak=False)
    connection_created.connect(_on_connection_created, dispatch_uid=_DISPATCH, weak=False)
    for connection in connections.all(initialized_only=True):
        _wrap(connection)
    request_finished.connect(_drop_all_claims, dispatch_uid=_DISPATCH, weak=False)


def uninstall() -> None:
    """Disconnect the hooks. The execute wrapper stays on the connections it is on: with no
    table watched it lets every statement through untouched."""
    for model in watched._registry.models:
        uid = f"{_DISPATCH}.{model._meta.label}"
        for signal in (pre_save, pre_delete, post_save, post_delete):
            signal.disconnect(sender=model, dispatch_uid=uid)
    for through in watched._registry.through:
        m2m_changed.disconnect(sender=through, dispatch_uid=f"{_DISPATCH}.{through._meta.label}")
    connection_created.disconnect(dispatch_uid=_DISPATCH)
    request_finished.disconnect(dispatch_uid=_DISPATCH)
    watched._registry.models = []
    watched._registry.through = []
    watched._registry.auto_through = {}
    watched._registry.primary_keys = {}
    watched._registry.tables = frozenset()


def _reinstall(**kwargs: Any) -> None:
    if kwargs.get("setting") == "WARPMESH" and apps.ready:
        try:
            install()
        except ImproperlyConfigured:
            uninstall()  # Invalid settings: the settings check reports them.
