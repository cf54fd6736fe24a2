"""Celery entry point: write the engines' usage events into Usage rows (scheduled by beat every few seconds)."""

from __future__ import annotations

import os
import socket

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def drain_usage_stream() -> int:
    from portal.common.redis import redis_client
    from portal.usage.services import usage_stream_drain

    return usage_stream_drain(client=redis_client(), consumer=f"{socket.gethostname()}-{os.getpid()}")
