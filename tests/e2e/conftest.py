"""One running lorafleet for the end-to-end tests of a module: real Redis, the test database, a Celery
worker, the engine daemon and the portal under uvicorn, each its own process.

Tenants and keys are made through the services; adapters are uploaded through the REST API, so
the worker validates and stages them into the shared cache as in production. Nothing here is
transactional: the module's data lives until its end, then the database and Redis are emptied.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import redis
from django.conf import settings

from tests.e2e.stack import Daemon, PortalServer, wait_for

if TYPE_CHECKING:
    from engine_daemon import Engine

# Read when pytest imports this file, before any fixture has switched the connection to a test database.
CONFIGURED_DATABASE = settings.DATABASES["default"]["NAME"]
TINY_MODEL = "tiny-chat"  # the directory's name is the base model's name
ADAPTERS = {  # name → (tenant, rank, seed)
    "parrot": ("tenant-a", 4, 11),
    "pelican": ("tenant-a", 8, 12),
    "kraken": ("tenant-b", 2, 13),
    "narwhal": ("tenant-b", 16, 14),
}


@dataclass
class Tenant:
    slug: str
    inference_key: str
    manage_key: str


@dataclass
class Stack:
    url: str
    redis_url: str
    redis: redis.Redis
    model_dir: Path
    cache_dir: Path
    logs: Path
    daemon: Daemon
    tenants: dict[str, Tenant]
    adapter_dirs: dict[str, Path] = field(default_factory=dict)
    worker: subprocess.Popen | None = None  # the Celery worker
    portal: PortalServer | None = None
    _offline: Engine | None = None

    def offline_engine(self) -> Engine:
        """The same model in this process, every adapter added under its name: the reference outputs."""
        if self._offline is None:
            from engine_daemon import Engine, EngineConfig

            engine = Engine(EngineConfig(model=str(self.model_dir), device="cpu", dtype="float32"))
            for name, folder in self.adapter_dirs.items():
                engine.add_adapter(name, str(folder))
            self._offline = engine
        return self._offline

    def openai(self, tenant: str = "tenant-a", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.tenants[tenant].inference_key, max_retries=0,
                             **kwargs)

    def async_openai(self, tenant: str = "tenant-a", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.tenants[tenant].inference_key,
                                  max_retries=0, **kwargs)

    def rest(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1", timeout=60,
                            headers={"Authorization": f"Bearer {self.tenants[tenant].manage_key}"})


@pytest.fixture(scope="module")
def db_access(django_db_setup, django_db_blocker):
    """The test database, outside any test transaction (the subprocesses must see what we write).

    pytest-django creates the test database only for sessions with a test marked ``django_db``; these tests
    are not (a test transaction would hide our writes, and a transactional test would flush them), so
    when this session has none, the test database is created here.
    """
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        if _on_test_database():
            yield
            return
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
        try:
            assert _on_test_database(), connection.settings_dict["NAME"]
            yield
        finally:
            teardown_databases(config, verbosity=0)


def _on_test_database() -> bool:
    """Whether the connection was switched to a test database (its name is no longer the configured one)."""
    from django.db import connection

    return connection.settings_dict["NAME"] != CONFIGURED_DATABASE




@pytest.fixture(scope="module")
def stack(db_access, redis_url, tmp_path_factory):
    from django.core.management import call_command

    from tests.engine.builders import write_adapter, write_tiny_model
    from tests.portal.celery_worker import celery_worker, database_url

    root = tmp_path_factory.mktemp("e2e")
    logs = root / "logs"
    logs.mkdir()
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    # a long context, so that a request can stream for seconds (the disconnect test)
    model_dir = write_tiny_model(root / TINY_MODEL, with_tokenizer=True, max_position_embeddings=4096)
    saved = {name: getattr(settings, name) for name in ("MEDIA_ROOT", "ADAPTER_CACHE_DIR", "REDIS_URL")}
    settings.MEDIA_ROOT = root / "media"
    settings.ADAPTER_CACHE_DIR = root / "adapter-cache"
    settings.ADAPTER_CACHE_DIR.mkdir()
    settings.REDIS_URL = redis_url
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DJANGO_SECRET_KEY": "e2e",
        "LORAFLEET_VAR_DIR": str(root / "portal-var"),
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "ADAPTER_CACHE_DIR": str(settings.ADAPTER_CACHE_DIR),
        "LORAFLEET_CELERY_QUEUE": settings.CELERY_TASK_DEFAULT_QUEUE,
        "LORAFLEET_PORTAL_METRICS": "0",
    }
    daemon = Daemon(model=str(model_dir), redis_url=redis_url, cache_dir=settings.ADAPTER_CACHE_DIR, log_dir=logs,
                    engine_id="e2e-first")
    server = PortalServer(env=env, log=logs / "portal.log")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_empty, client, call_command)
        cleanup.callback(lambda: [setattr(settings, name, value) for name, value in saved.items()])
        worker = cleanup.enter_context(celery_worker(logs / "worker.log"))
        daemon.start()
        cleanup.callback(daemon.stop)
        server.start()
        cleanup.callback(server.stop)
        daemon.wait_ready()
        tenants = {slug: _tenant(slug) for slug in ("tenant-a", "tenant-b")}
        found = Stack(url=server.url, redis_url=redis_url, redis=client, model_dir=model_dir,
                      cache_dir=settings.ADAPTER_CACHE_DIR, logs=logs, daemon=daemon, tenants=tenants, worker=worker,
                      portal=server)
        # The base model is known from the daemon's registration alone: listing the models syncs it.
        assert TINY_MODEL in [m.id for m in found.openai().models.list()]
        for name, (slug, rank, seed) in ADAPTERS.items():
            folder = write_adapter(model_dir, root / "adapters" / name, r=rank, seed=seed)
            found.adapter_dirs[name] = folder
            _upload(found, slug, name, folder)
        for name, (slug, _rank, _seed) in ADAPTERS.items():
            _wait_ready(found, slug, name, worker, logs / "worker.log")
        yield found


def _tenant(slug: str) -> Tenant:
    from tests.portal import factories

    tenant = factories.tenant_with_member(slug)[0]
    tenant.requests_per_minute = None  # the kill test sends 20 at once; limits have their own tests
    tenant.tokens_per_minute = None
    tenant.save()
    _key, inference = factories.api_key_for(tenant, scopes=("inference",), name="inference")
    _key, manage = factories.api_key_for(tenant, scopes=("manage",), name="manage")
    return Tenant(slug, inference, manage)


def _upload(stack: Stack, tenant: str, name: str, folder: Path) -> None:
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    with stack.rest(tenant) as rest:
        reply = rest.post("/adapters", data={"name": name, "base_model": TINY_MODEL}, files=files)
    assert reply.status_code == 202, reply.text


def _wait_ready(stack: Stack, tenant: str, name: str, worker, log: Path) -> None:
    def ready() -> bool:
        assert worker.poll() is None, "the Celery worker died"
        with stack.rest(tenant) as rest:
            version = rest.get(f"/adapters/{name}/versions/1").json()
        assert version["status"] != "rejected", version
        return version["status"] == "ready"

    wait_for(ready, f"adapter {name} ready", 120, log)


def _empty(client: redis.Redis, call_command: Callable[..., Any]) -> None:
    """Leave the database and Redis as empty as the next test module expects them."""
    assert _on_test_database()  # never flush a real database
    call_command("flush", interactive=False, verbosity=0)
    client.flushdb()
    client.close()
