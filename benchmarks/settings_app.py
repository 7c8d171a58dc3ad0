"""benchmarks.settings with the ``django_warpmesh`` app installed, as a deployment has it: its
peer table (discovery: ``benchmarks.join_latency``), its ORM hooks, its node's exit path as
``manage.py`` runs it (section 6's short-lived writers).

Not the plain benchmark settings: their workers keep the ORM hooks out of what they measure
(``benchmarks.orm`` times the hooks on their own). The peer table is made by
``migrate django_warpmesh``.
"""

from __future__ import annotations

from benchmarks.settings import *  # noqa: F403
from benchmarks.settings import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "django_warpmesh"]
