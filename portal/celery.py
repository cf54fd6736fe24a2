"""The Celery app: broker = REDIS_URL, configuration from the CELERY_* Django settings.

Run a worker with ``celery -A portal worker -Q lorafleet``.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
