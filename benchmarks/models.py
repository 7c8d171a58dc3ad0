"""The one model of the ORM benchmark. Its table is created and dropped by the benchmark itself
(``schema_editor``), never by migrations: the benchmarks leave nothing behind in a database."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class BenchItem(models.Model):
    objects: ClassVar[models.Manager[BenchItem]] = models.Manager()
    name = models.CharField(max_length=100)
    category = models.IntegerField(db_index=True)
    price = models.IntegerField()
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "warpmesh_bench_item"

    def __str__(self) -> str:
        return self.name
