"""Exit 0 when the database server the suite uses is reachable, 1 otherwise (scripts/test).

``python -m tests.server_available postgresql`` or ``... mariadb``; the same environment
variables as tests/settings.py say where.
"""

from __future__ import annotations

import os
import sys


def reachable(server: str) -> str | None:
    """None if ``server`` answers, else why not."""
    if server == "postgresql":
        import psycopg

        try:
            with psycopg.connect(
                host=os.environ.get("WARPMESH_PG_HOST", "127.0.0.1"),
                port=int(os.environ.get("WARPMESH_PG_PORT", "5432")),
                dbname=os.environ.get("WARPMESH_PG_NAME", "test"),
                user=os.environ.get("WARPMESH_PG_USER", "postgres"),
                connect_timeout=3,
            ) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error as exc:
            return str(exc)
        return None
    if server == "mariadb":
        import pymysql

        try:
            connection = pymysql.connect(
                host=os.environ.get("WARPMESH_MARIADB_HOST", "127.0.0.1"),
                port=int(os.environ.get("WARPMESH_MARIADB_PORT", "3306")),
                user=os.environ.get("WARPMESH_MARIADB_USER", "root"),
                password=os.environ.get("WARPMESH_MARIADB_PASSWORD", ""),
                database=os.environ.get("WARPMESH_MARIADB_NAME", "test"),
                connect_timeout=3,
            )
            with connection, connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except pymysql.MySQLError as exc:
            return str(exc)
        return None
    raise SystemExit(f"unknown server {server!r}: postgresql or mariadb")


def require(server: str) -> None:
    """Skip the calling test when ``server`` does not answer; with CI=true, fail it instead
    (CI must run the tests that need it)."""
    import pytest

    problem = reachable(server)
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the tests that need {server}, but: {problem}")
    pytest.skip(f"{server} unreachable: {problem}")


def main(argv: list[str]) -> int:
    (server,) = argv
    problem = reachable(server)
    if problem is not None:
        print(f"{server} unreachable: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
