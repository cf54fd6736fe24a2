"""Nobody waits behind one slow thing: a /v1 key check never queues behind another request's sync work.

Under ASGI, Django runs each request's sync code (a usage report, a large upload's multipart
parse) on a thread of that request's own (``ThreadSensitiveContext``), and the /v1 path calls its
sync parts the same way, so a slow report holds up only itself. Shown with a report made slow on
purpose (its selector waits on an event) while another tenant's key is checked on /v1.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from portal.usage import apis as usage_apis
from tests.portal import factories

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_slow_report_holds_up_no_key_check(tenant_a, tenant_b, base_model, redis_client, monkeypatch):
    _key, manage = factories.api_key_for(tenant_a[0], scopes=("manage",))
    _key, inference = factories.api_key_for(tenant_b[0], scopes=("inference",))
    inside, release = threading.Event(), threading.Event()
    real_summary = usage_apis.usage_summary

    def slow_summary(**kwargs):
        inside.set()
        release.wait(30)
        return real_summary(**kwargs)

    monkeypatch.setattr(usage_apis, "usage_summary", slow_summary)

    async def main() -> None:
        from portal.asgi import application  # the handler uvicorn serves, not the test client's

        transport = httpx.ASGITransport(app=application)
        client = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        report = asyncio.ensure_future(client.get("/api/v1/usage", headers={"Authorization": f"Bearer {manage}"}))
        assert await asyncio.get_running_loop().run_in_executor(None, inside.wait, 20)
        models = await asyncio.wait_for(
            client.get("/v1/models", headers={"Authorization": f"Bearer {inference}"}), timeout=20)
        assert models.status_code == 200 and not report.done()  # answered while the report still runs
        release.set()
        assert (await report).status_code == 200
        await client.aclose()

    try:
        asyncio.run(main())
    finally:
        release.set()
