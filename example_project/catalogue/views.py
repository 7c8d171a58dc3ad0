"""Pages cached in each instance's own memory, with tags, so any write anywhere evicts them."""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation

from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from django_warpmesh import cached_queryset
from example_project.catalogue.models import Product

INSTANCE = os.environ.get("DEMO_INSTANCE", "?")


def _card_key(pk: int) -> str:
    return f"product:{pk}:card"


def product_list(request: HttpRequest) -> HttpResponse:
    # Tagged with every table the query reads (products and categories): any write evicts it.
    products = cached_queryset(
        Product.objects.select_related("category"), timeout=300, key="catalogue:list"
    )
    return render(request, "catalogue/list.html", {"products": products, "instance": INSTANCE})


def _card(pk: int) -> tuple[dict[str, str], bool]:
    """The product's card and whether it came from this instance's memory."""
    hit = True

    def load() -> dict[str, str]:
        nonlocal hit
        hit = False
        product = get_object_or_404(Product.objects.select_related("category"), pk=pk)
        return {
            "name": product.name,
            "category": product.category.name,
            "price": str(product.price),
        }

    card = cache.get_or_set(_card_key(pk), load, timeout=300, tags=[Product(pk=pk)])
    return card, hit


def product_detail(request: HttpRequest, pk: int) -> HttpResponse:
    card, hit = _card(pk)
    context = {"card": card, "pk": pk, "instance": INSTANCE}
    response = render(request, "catalogue/detail.html", context)
    response["X-Cache"] = "hit" if hit else "miss"
    response["X-Instance"] = INSTANCE
    return response


def product_json(request: HttpRequest, pk: int) -> JsonResponse:
    """The card as JSON, and whether it came from this instance's memory (for the demo)."""
    card, hit = _card(pk)
    return JsonResponse({"instance": INSTANCE, "was_cached": hit, **card})


def cache_state(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"instance": INSTANCE, "cached": cache.has_key(_card_key(pk))})


@csrf_exempt  # The demo drives it with plain HTTP; the site listens on 127.0.0.1 only.
@require_POST
def set_price(request: HttpRequest, pk: int) -> HttpResponse:
    product = get_object_or_404(Product, pk=pk)
    try:
        product.price = Decimal(request.POST["price"])
    except (KeyError, InvalidOperation):
        return JsonResponse({"error": "price must be a decimal number"}, status=400)
    product.save()  # post_save evicts the card here and, through the mesh, everywhere else
    if request.headers.get("Accept") == "application/json":
        return JsonResponse({"instance": INSTANCE, "price": str(product.price)})
    return redirect("product-detail", pk=pk)
