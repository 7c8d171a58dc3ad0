"""Settings of the demo: one SQLite file shared by every instance, MeshCache as the default cache.

Each instance gets its mesh port from the environment (``WARPMESH_PORT``) and finds the others
through the peer table in that SQLite file: no addresses configured.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "warpmesh-demo-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_warpmesh",
    "example_project.catalogue",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example_project.urls"
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
STATIC_URL = "/static/"
# The dashboard is staff-only by default; the demo opens it to everyone on 127.0.0.1.
WARPMESH_DASHBOARD_PERMISSION = "public"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DEMO_DATABASE", str(BASE_DIR / "demo.sqlite3")),
        # Several processes write this file (requests, and each node's peer-table refresh):
        # take the write lock at BEGIN so two transactions never deadlock upgrading theirs.
        "OPTIONS": {"transaction_mode": "IMMEDIATE"},
    }
}
if os.environ.get("DATABASE_URL"):
    # postgres://user[:password]@host[:port]/name: the one other database the demo knows.
    url = urlsplit(os.environ["DATABASE_URL"])
    if url.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured("DATABASE_URL must be a postgres:// URL.")
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/"),
        "USER": url.username or "",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "",
        "PORT": str(url.port or ""),
    }
CACHES = {
    "default": {
        "BACKEND": "django_warpmesh.cache.MeshCache",
        "LOCATION": "demo",
        "TIMEOUT": 300,
    }
}
WARPMESH = {
    "BIND": "127.0.0.1",
    "HEARTBEAT": 0.25,
    # Sessions are written on every login and never cached: no need to watch them.
    "ORM_EXCLUDE": ["sessions"],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"short": {"format": "    [%(process)d] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "short"}},
    "loggers": {"django_warpmesh": {"handlers": ["console"], "level": "WARNING"}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
