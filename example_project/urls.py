from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from example_project.catalogue import views

urlpatterns = [
    path("", views.product_list, name="product-list"),
    path("product/<int:pk>/", views.product_detail, name="product-detail"),
    path("product/<int:pk>/price/", views.set_price, name="set-price"),
    path("product/<int:pk>/json", views.product_json, name="product-json"),
    path("product/<int:pk>/cache-state", views.cache_state, name="cache-state"),
    path("admin/", admin.site.urls),
    path("warpmesh/", include("django_warpmesh.urls")),
]
