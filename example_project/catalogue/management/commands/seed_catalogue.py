from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand

from example_project.catalogue.models import Category, Product

CATALOGUE = {
    "Books": [("The Pragmatic Programmer", "39.90"), ("Designing Data-Intensive Apps", "44.50")],
    "Games": [("Go board", "59.00"), ("Chess set", "25.00")],
}


class Command(BaseCommand):
    help = "Fill the demo catalogue (idempotent)."

    def handle(self, *args: Any, **options: Any) -> None:
        for category_name, products in CATALOGUE.items():
            category, _ = Category.objects.get_or_create(name=category_name)
            for name, price in products:
                Product.objects.update_or_create(
                    name=name, defaults={"category": category, "price": Decimal(price)}
                )
        self.stdout.write(
            f"{Product.objects.count()} products in {Category.objects.count()} categories"
        )
