from __future__ import annotations

from django.db import models


class Category(models.Model):
    name = models.CharField(max_length=100)


class Product(models.Model):
    name = models.CharField(max_length=100)
    price = models.IntegerField(default=0)
    category = models.ForeignKey(Category, null=True, on_delete=models.CASCADE)
    tags = models.ManyToManyField("Tag", blank=True)  # type: ignore[var-annotated]


class Tag(models.Model):
    name = models.CharField(max_length=50)


class Place(models.Model):
    name = models.CharField(max_length=100)


class Restaurant(Place):
    """Multi-table inheritance, with a symmetrical many-to-many to itself."""

    serves = models.CharField(max_length=100, blank=True)
    neighbours = models.ManyToManyField("self", blank=True)


class Node(models.Model):
    """Deleting a node sets its children's parent to NULL: an UPDATE of the table it is deleted
    from."""

    name = models.CharField(max_length=100)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL)
