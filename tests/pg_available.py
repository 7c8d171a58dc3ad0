"""Exit 0 when the PostgreSQL the suite uses is reachable, 1 otherwise (used by scripts/test)."""

from __future__ import annotations

import os
import sys


def main() -> int:
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
        print(f"PostgreSQL unreachable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
