"""``path("warpmesh/", include("django_warpmesh.urls"))``: the dashboard and the stats endpoint.

* ``warpmesh/``: the HTML dashboard (auto-refreshing);
* ``warpmesh/api/stats``: this process's stats as JSON (GL Mesh's ``/api/stats`` shape, plus ours);
* ``warpmesh/assets/<name>``: the dashboard's script and style sheet.

Staff only by default: see ``WARPMESH_DASHBOARD_PERMISSION`` in docs/operations.md.
"""

from __future__ import annotations

from django.urls import path

from django_warpmesh import views

app_name = "django_warpmesh"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("api/stats", views.stats, name="stats"),
    path("assets/<str:name>", views.asset, name="asset"),
]
