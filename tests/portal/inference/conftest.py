"""/v1 tests: the real ASGI application, real Redis, and a scripted engine (FakeEngine) on the wire protocol.

Requests run in the ASGI handler's own threads, so the tests that reach the database are transactional.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import openai
import pytest

from tests.portal import factories
from tests.portal.inference.fake_engine import FakeEngine

BASE_URL = "http://testserver"


def run(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on a fresh event loop, then close the portal's Redis client of that loop."""

    async def main() -> Any:
        from portal.inference.services import async_redis

        try:
            return await make()
        finally:
            await async_redis().aclose()

    return asyncio.run(main())


def asgi_client(**kwargs: Any) -> httpx.AsyncClient:
    from portal.asgi import application

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=BASE_URL, **kwargs)


def openai_client(secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key=secret, max_retries=0, http_client=asgi_client())


@pytest.fixture
def engine(redis_client, base_model):
    with FakeEngine(redis_client) as fake:
        yield fake


@pytest.fixture
def tenant(db):
    return factories.tenant_with_member("acme", username="ann")[0]


@pytest.fixture
def secret(tenant) -> str:
    return factories.api_key_for(tenant, scopes=("inference",))[1]


@pytest.fixture
def auth(secret) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}
