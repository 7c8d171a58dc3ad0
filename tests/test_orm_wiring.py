"""The ORM hooks are wired by ``install()`` (the app's ``ready()`` calls it), never on import."""

from __future__ import annotations

import subprocess
import sys

from django.core.signals import setting_changed

from django_warpmesh import cache, orm
from django_warpmesh.orm.transactions import _uncommitted_by_this_thread
from harness import ROOT

# A fresh interpreter without the app: this one imported the package long ago and installed it.
IMPORT_ONLY = """
import django
from django.conf import settings

settings.configure(INSTALLED_APPS=["django.contrib.contenttypes"])
django.setup()

import django_warpmesh.orm
from django.core.signals import setting_changed
from django_warpmesh import cache

assert not cache._store_guards, cache._store_guards
uids = [key[0] for key, *_ in setting_changed.receivers]
assert not any("django_warpmesh.orm" in str(uid) for uid in uids), uids
"""


def test_importing_the_orm_package_connects_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_install_keeps_the_hooks_in_step_with_the_settings_and_guards_the_store() -> None:
    orm.install()
    orm.install()  # idempotent
    uids = [key[0] for key, *_ in setting_changed.receivers]
    assert uids.count("django_warpmesh.orm.reinstall") == 1
    assert cache._store_guards.count(_uncommitted_by_this_thread) == 1
