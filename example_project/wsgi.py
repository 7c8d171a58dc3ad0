"""WSGI entry point: ``gunicorn example_project.wsgi -w 4`` (see example_project/README.md)."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
application = get_wsgi_application()
