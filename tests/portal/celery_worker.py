"""A real Celery worker process for end-to-end tests: same database, Redis, media and cache as the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def database_url() -> str:
    """The URL of the test database this process uses (pytest-django renamed it)."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextlib.contextmanager
def celery_worker(log_path: Path) -> Iterator[subprocess.Popen]:
    """``celery -A portal worker`` in a subprocess, and this process's tasks sent to it through Redis."""
    from portal.celery import app
    from portal.settings import celery_broker_url

    broker = celery_broker_url(settings.REDIS_URL)
    saved = app.conf.broker_url, app.conf.task_always_eager
    app.conf.broker_url, app.conf.task_always_eager = broker, False
    _forget_broker_connections(app)  # producers connect to the test's Redis from now on
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DJANGO_SECRET_KEY": "test-worker",
        "LORAFLEET_VAR_DIR": str(log_path.parent / "worker-var"),
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "ADAPTER_CACHE_DIR": str(settings.ADAPTER_CACHE_DIR),
        "LORAFLEET_MAX_LORA_RANK": str(settings.LORAFLEET_MAX_LORA_RANK),
        "LORAFLEET_CELERY_QUEUE": app.conf.task_default_queue,
    }
    command = [sys.executable, "-m", "celery", "-A", "portal", "worker", "--pool=solo", "--concurrency=1",
               "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel=INFO",
               "-Q", app.conf.task_default_queue]
    with log_path.open("w") as log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield worker
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: finish the task at hand
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        app.conf.broker_url, app.conf.task_always_eager = saved
        _forget_broker_connections(app)


def _forget_broker_connections(app) -> None:
    from kombu import pools

    pools.reset()  # closes kombu's process-wide connection and producer pools
    app._pool = None
    app.amqp._producer_pool = None
