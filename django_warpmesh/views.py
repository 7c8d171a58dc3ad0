"""The stats endpoint and the HTML dashboard: this process's view of the mesh.

``path("warpmesh/", include("django_warpmesh.urls"))``. Who may see them is decided by the
``WARPMESH_DASHBOARD_PERMISSION`` setting (staff by default), or by a ``permission`` keyword
given in the URLconf, which wins: ``path("warpmesh/", include(...), {"permission": "public"})``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

import django_warpmesh
from django_warpmesh.conf import dashboard_permission, resolve_permission

# Seconds between two refreshes of the dashboard; ``?refresh=N`` picks another (1-3600).
DEFAULT_REFRESH = 2


def _user(request: HttpRequest) -> Any:
    return getattr(request, "user", None)


def _allowed(request: HttpRequest, permission: object) -> bool:
    check = dashboard_permission() if permission is None else resolve_permission(permission)
    return bool(check(request))


def _guarded(*, page: bool) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Refuse who may not see the mesh: a login redirect for a page, 403 otherwise."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(
            request: HttpRequest, *args: Any, permission: object = None, **kwargs: Any
        ) -> HttpResponse:
            if _allowed(request, permission):
                return view(request, *args, **kwargs)
            user = _user(request)
            if page and user is not None and not user.is_authenticated:
                # Imported here: the views (and the checks using this module) must not need
                # django.contrib.auth unless the permission does.
                from django.contrib.auth.views import redirect_to_login

                return redirect_to_login(request.get_full_path(), _login_url())
            if page:
                raise PermissionDenied("not allowed to see the mesh")  # the project's 403 page
            return JsonResponse({"error": "forbidden"}, status=403)

        return wrapper

    return decorator


def _login_url() -> str:
    try:
        return reverse("admin:login")
    except NoReverseMatch:
        return str(settings.LOGIN_URL)


def stats_payload() -> dict[str, Any]:
    """This process's ``mesh_stats()`` (GL Mesh's ``/api/stats`` keys, plus ours)."""
    stats = django_warpmesh.mesh_stats()
    peers = stats.get("peers") or []
    return {
        **stats,
        "health": health(stats),
        "peers_connected": sum(1 for peer in peers if peer.get("connected")),
        "peers_known": len(peers),
        "warpmesh_version": django_warpmesh.__version__,
    }


def health(stats: dict[str, Any]) -> str:
    """One word for this process's view: disabled, starting, degraded or healthy."""
    if not stats.get("enabled"):
        return "disabled"
    if not stats.get("ready"):
        return "starting"
    peers = stats.get("peers") or []
    if stats.get("degraded") or not all(peer.get("connected") for peer in peers):
        return "degraded"
    return "healthy"


@require_GET
@never_cache
@_guarded(page=False)
def stats(request: HttpRequest) -> HttpResponse:
    return JsonResponse(stats_payload())


def _refresh(request: HttpRequest) -> int:
    try:
        seconds = int(request.GET.get("refresh", DEFAULT_REFRESH))
    except ValueError:
        return DEFAULT_REFRESH
    return min(max(seconds, 1), 3600)


@require_GET
@never_cache
@_guarded(page=True)
def dashboard(request: HttpRequest) -> HttpResponse:
    match = request.resolver_match
    namespace = (match.namespace if match is not None else "") or "django_warpmesh"
    return render(
        request,
        "django_warpmesh/dashboard.html",
        {
            "stats": stats_payload(),
            "refresh": _refresh(request),
            "stats_url": reverse(f"{namespace}:stats"),
            "script_url": reverse(f"{namespace}:asset", args=["dashboard.js"]),
            "style_url": reverse(f"{namespace}:asset", args=["dashboard.css"]),
        },
    )


ASSETS_DIR = Path(__file__).resolve().parent / "static" / "django_warpmesh"
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


@require_GET
def asset(request: HttpRequest, name: str, permission: object = None) -> HttpResponse:
    """The dashboard's script and style sheet, served from the package so that no static files
    set-up is needed and a Content-Security-Policy of ``'self'`` is enough. They hold no data
    (the page and the stats are what is guarded)."""
    if name not in _ASSETS:
        raise Http404(name)
    response = HttpResponse((ASSETS_DIR / name).read_bytes(), content_type=_ASSETS[name])
    response["Cache-Control"] = "public, max-age=300"
    return response
