from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("warpmesh/", include("django_warpmesh.urls")),
    # The same views, opened to everyone by a keyword in the URLconf (the setting says staff).
    path(
        "warpmesh-public/",
        include(("django_warpmesh.urls", "django_warpmesh"), namespace="warpmesh_public"),
        {"permission": "public"},
    ),
]
