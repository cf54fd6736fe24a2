"""A real engine daemon in the test process, serving adapters that went through the portal's own upload path.

One device slot and one host-RAM place, so that three adapters end up one in each tier:
``pirate`` (tenant A) in GPU rows 0–1, ``support-bot`` (tenant A) on disk only, ``shouty`` (tenant B) in host RAM.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from engine_daemon import Engine, EngineConfig, protocol
from engine_daemon.protocol import EngineSnapshot, InferenceRequest
from engine_daemon.service import EngineService, ServiceConfig
from portal.adapters import services
from portal.adapters.models import AdapterVersion
from portal.adapters.uploads import AdapterUpload
from portal.base_models.services import base_model_register_by_name
from tests.engine.builders import pool_bytes
from tests.portal import factories

ENGINE_ID = "ops-engine"
SHORT = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


@dataclass
class Fleet:
    service: EngineService
    redis: object
    versions: dict[str, AdapterVersion]
    rejected: AdapterVersion

    def sha(self, name: str) -> str:
        return self.versions[name].sha256

    def step_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the engine did not get there in time"
            self.service.run_once()

    def enqueue(self, sha: str | None, prompt: str = "Ahoy") -> InferenceRequest:
        request = InferenceRequest(request_id=uuid.uuid4().hex, tenant_id="t", base_model=self.service.base_model,
                                   prompt=prompt, adapter_sha256=sha, sampling=SHORT, created=time.time())
        pipe = self.redis.pipeline(transaction=True)
        protocol.enqueue_request(pipe, request)
        pipe.execute()
        return request

    def enqueue_malformed(self) -> str:
        """An entry no engine can read, on tenant t's stream; returns the stream."""
        stream = protocol.request_stream(self.service.base_model, "t")
        self.redis.hset(protocol.tenant_index(self.service.base_model), "t", "1.0")
        self.redis.xadd(stream, {"v": "99", "type": "request", "body": "{}"})
        return stream

    def serve(self, sha: str | None) -> None:
        """One request to its end."""
        request = self.enqueue(sha)
        stream = protocol.response_stream(request.request_id)
        self.step_until(lambda: any(f[b"type"] != b"delta" for _id, f in self.redis.xrange(stream)))

    def beat(self) -> EngineSnapshot:
        """Write the heartbeat now; returns the engine's own numbers at that moment."""
        self.service._beat(force=True)
        return self.service.engine.snapshot()


def upload(tenant, base_model, name: str, folder: Path, run_on_commit) -> AdapterVersion:
    with run_on_commit():
        version = services.adapter_create(tenant=tenant, name=name, base_model=base_model,
                                          upload=factories.parts_upload(folder))
    version.refresh_from_db()
    assert version.status == "ready", version.error
    return version


def start_fleet(*, model_dir: Path, adapter_dirs: list[Path], tenant_a, tenant_b, redis_client, redis_url,
                run_on_commit) -> Fleet:
    base_model = base_model_register_by_name(model=str(model_dir))
    # Device room for one of the (rank-2) adapters and one host-RAM place: each switch evicts.
    engine = Engine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_loras=1, max_cpu_loras=1,
                                 lora_pool_bytes=pool_bytes(model_dir, [2])))
    config = ServiceConfig(redis_url=redis_url, adapter_cache_dir=settings.ADAPTER_CACHE_DIR, engine_id=ENGINE_ID)
    service = EngineService(engine, config, client=redis_client)
    service.start()
    fleet = Fleet(service, redis_client, {}, None)  # type: ignore[arg-type]
    residency = engine.residency
    for name, folder in (("support-bot", adapter_dirs[0]), ("pirate", adapter_dirs[1])):
        fleet.versions[name] = upload(tenant_a, base_model, name, folder, run_on_commit)
    # The staged events make the engine register both and read them into host RAM (one place: the last stays).
    fleet.step_until(lambda: all(engine.has_adapter(v.sha256) for v in fleet.versions.values()) and not residency.busy)
    fleet.serve(fleet.sha("pirate"))  # from host RAM onto the device (rows 0-1)
    fleet.serve(fleet.sha("support-bot"))  # from disk into rows 0-1, evicting pirate (and pushing it out of host RAM)
    fleet.serve(fleet.sha("pirate"))  # back from disk; support-bot is left on disk only
    fleet.versions["shouty"] = upload(tenant_b, base_model, "shouty", adapter_dirs[2], run_on_commit)
    fleet.step_until(lambda: engine.has_adapter(fleet.sha("shouty")) and residency.records[fleet.sha("shouty")].host is not None)
    fleet.rejected = upload_rejected(tenant_b, base_model, "broken", adapter_dirs[0], run_on_commit)
    return fleet


def upload_rejected(tenant, base_model, name: str, folder: Path, run_on_commit) -> AdapterVersion:
    """An upload whose weights are not a safetensors file: the worker rejects it."""
    garbage = AdapterUpload(
        adapter_config=factories.uploaded(folder / "adapter_config.json"),
        adapter_model=SimpleUploadedFile("adapter_model.safetensors", b"\x10\x00" + b"garbage" * 10),
    )
    with run_on_commit():
        version = services.adapter_create(tenant=tenant, name=name, base_model=base_model, upload=garbage)
    version.refresh_from_db()
    assert version.status == "rejected", version.status
    return version
