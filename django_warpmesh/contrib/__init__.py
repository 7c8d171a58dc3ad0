"""Integrations with other libraries, each optional: importing one needs that library installed."""
