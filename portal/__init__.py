"""The lorafleet portal: tenants, adapters, API keys (Django), and its Celery workers."""

from portal.celery import app as celery_app

__all__ = ["celery_app"]
