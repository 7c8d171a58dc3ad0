from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings

from tests.cluster import migrate, pg_connect

SHARED_PG_DATABASE = "test_warpmesh_shared"


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A migrated database of its own that every process of a test opens: the env to reach it.

    A SQLite file, or (with ``WARPMESH_TEST_DB=postgresql``) a PostgreSQL database made here.
    """
    admin_db = settings.DATABASES["default"]["NAME"]
    postgresql = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    if postgresql:
        with pg_connect(admin_db) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SHARED_PG_DATABASE} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {SHARED_PG_DATABASE}")
        env = {"WARPMESH_PG_NAME": SHARED_PG_DATABASE}
    else:
        path = tmp_path_factory.mktemp("shared") / "shared.sqlite3"
        env = {"WARPMESH_SQLITE_PATH": str(path)}
    migrate(env)
    yield env
    if postgresql:
        with pg_connect(admin_db) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {SHARED_PG_DATABASE} WITH (FORCE)")
