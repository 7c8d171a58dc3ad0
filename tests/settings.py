"""Settings for the test suite.

``WARPMESH_TEST_DB`` picks SQLite (default), PostgreSQL or MariaDB; ``WARPMESH_TEST_USE_TZ``
(``true`` by default) sets ``USE_TZ``, for the time zone matrix of the peer table.
"""

from __future__ import annotations

import os
import tempfile

SECRET_KEY = "django-warpmesh-tests-not-secret"
DEBUG = False
USE_TZ = os.environ.get("WARPMESH_TEST_USE_TZ", "true") == "true"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_warpmesh",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

TEST_DB = os.environ.get("WARPMESH_TEST_DB", "sqlite")
if TEST_DB == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("WARPMESH_PG_HOST", "127.0.0.1"),
            "PORT": os.environ.get("WARPMESH_PG_PORT", "5432"),
            "NAME": os.environ.get("WARPMESH_PG_NAME", "test"),
            "USER": os.environ.get("WARPMESH_PG_USER", "postgres"),
            "TEST": {"NAME": os.environ.get("WARPMESH_PG_TEST_NAME", "test_django_warpmesh")},
        }
    }
elif TEST_DB == "mariadb":
    # PyMySQL, pure Python, so the test extra installs anywhere (mysqlclient needs the MariaDB
    # client headers); it stands in for mysqlclient under the name Django's backend imports.
    import pymysql

    pymysql.version_info = (2, 2, 1, "final", 0)  # the mysqlclient version Django requires
    pymysql.install_as_MySQLdb()
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.mysql",
            "HOST": os.environ.get("WARPMESH_MARIADB_HOST", "127.0.0.1"),
            "PORT": os.environ.get("WARPMESH_MARIADB_PORT", "3306"),
            "NAME": os.environ.get("WARPMESH_MARIADB_NAME", "test"),
            "USER": os.environ.get("WARPMESH_MARIADB_USER", "root"),
            "PASSWORD": os.environ.get("WARPMESH_MARIADB_PASSWORD", ""),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {"NAME": os.environ.get("WARPMESH_MARIADB_TEST_NAME", "test_django_warpmesh")},
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get(
                "WARPMESH_SQLITE_PATH", os.path.join(tempfile.gettempdir(), "warpmesh-tests.db")
            ),
            # A file, not SQLite's shared in-memory database: tests that read from a second
            # thread while the first holds a write transaction need real file locking.
            "TEST": {
                "NAME": os.environ.get("WARPMESH_SQLITE_TEST_PATH")
                or os.path.join(tempfile.gettempdir(), f"warpmesh-test-{os.getpid()}.sqlite3")
            },
        }
    }

if os.environ.get("WARPMESH_MESH_DB_PATH"):
    # A second database holding only the peer table (WARPMESH["DATABASE"] = "mesh").
    DATABASES["mesh"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["WARPMESH_MESH_DB_PATH"],
    }

CACHES = {
    "default": {
        "BACKEND": "django_warpmesh.cache.MeshCache",
        "LOCATION": "default",
        "OPTIONS": {"MAX_ENTRIES": 10_000},
    },
    "other": {
        "BACKEND": "django_warpmesh.cache.MeshCache",
        "LOCATION": "other",
    },
    "bulk": {
        "BACKEND": "django_warpmesh.cache.MeshCache",
        "LOCATION": "bulk",
        "OPTIONS": {"MAX_ENTRIES": 1_000_000},
    },
}

# The in-process tests run alone; mesh tests start their own processes with their own settings.
WARPMESH = {"PEERS": [], "ENABLED": os.environ.get("WARPMESH_ENABLED", "false")}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_warpmesh": {"handlers": ["console"], "level": "INFO"}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The live server of the browser test serves STATIC_URL; the dashboard itself needs no static
# files set-up (its script and style sheet are served by its own views).
STATIC_URL = "/static/"
STATIC_ROOT = os.path.join(tempfile.gettempdir(), "warpmesh-tests-static")
