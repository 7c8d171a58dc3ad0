from __future__ import annotations

from django.contrib import admin

from example_project.catalogue.models import Category, Product

admin.site.register(Category)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "category", "price"]
    list_editable = ["price"]
