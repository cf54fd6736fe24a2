"""A real Celery worker process against real Redis: upload → validate → stage → ready."""

from __future__ import annotations

import json
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from engine_daemon.peft_format import MANIFEST_FILE, adapter_content_sha256
from engine_daemon.protocol import CONTROL_STREAM, ControlEvent
from portal.adapters.models import AdapterVersion
from tests.portal import factories
from tests.portal.adapters.bad_uploads import CORPUS
from tests.portal.celery_worker import celery_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
FINISHED = (AdapterVersion.Status.READY, AdapterVersion.Status.REJECTED)


def client_for(tenant) -> APIClient:
    _key, secret = factories.api_key_for(tenant)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def post(client, url, parts: dict, **fields):
    files = {field: SimpleUploadedFile(name, data) for field, (name, data) in parts.items()}
    response = client.post(url, {**fields, **files})
    assert response.status_code == 202, response.content
    return response.json()


def wait_until_finished(ids: list[int], worker, log_path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while AdapterVersion.objects.filter(pk__in=ids).exclude(status__in=FINISHED).exists():
        assert worker.poll() is None, "the worker died:\n" + log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, "versions did not finish:\n" + log_path.read_text()[-4000:]
        time.sleep(0.1)


def test_uploads_are_validated_and_staged_by_a_real_worker(
    tenant_a, tenant_b, base_model, peft_dir, peft_zip, bad_sources, redis_client, settings, tmp_path
):
    alice, bob = client_for(tenant_a[0]), client_for(tenant_b[0])
    log_path = tmp_path / "worker.log"
    # The bad cases that need other settings would need another worker; the rest all go to this one.
    corpus = [case for case in CORPUS if not case.settings]

    zip_parts = {"archive": ("adapter.zip", peft_zip.read_bytes())}
    with celery_worker(log_path) as worker:
        good = post(bob, "/api/v1/adapters", zip_parts, name="support-bot")
        bad = {}
        for case in corpus:
            if bad:
                body = post(alice, "/api/v1/adapters/bad/versions", case.build(bad_sources))
            else:
                body = post(alice, "/api/v1/adapters", case.build(bad_sources), name="bad")
            bad[body["version"]] = case
        wait_until_finished(list(AdapterVersion.objects.values_list("pk", flat=True)), worker, log_path)

        # the worker survived every bad upload: a good one sent after them all is still served
        after = post(alice, "/api/v1/adapters/bad/versions", zip_parts)
        wait_until_finished([after_pk(after)], worker, log_path)
        assert worker.poll() is None

    for number, case in bad.items():
        version = alice.get(f"/api/v1/adapters/bad/versions/{number}").json()
        assert version["status"] == "rejected", (case.id, version)
        assert case.expect in version["error"], (case.id, version["error"])

    sha = adapter_content_sha256(peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors")
    for client, body in ((bob, good), (alice, after)):
        version = client.get(body["url"]).json()
        assert (version["status"], version["sha256"], version["is_default"]) == ("ready", sha, True), version

    # exactly one cache entry, complete, whose manifest is the version's
    entries = sorted(p.name for p in settings.ADAPTER_CACHE_DIR.iterdir() if not p.name.startswith("."))
    assert entries == [sha]
    folder = settings.ADAPTER_CACHE_DIR / sha
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE]
    assert json.loads((folder / MANIFEST_FILE).read_text()) == bob.get(good["url"]).json()["manifest"]

    events = [ControlEvent.from_redis(fields) for _id, fields in redis_client.xrange(CONTROL_STREAM)]
    staged = {(e.action, e.sha256, e.adapter, e.tenant_id) for e in events}
    assert staged == {
        (ControlEvent.ADAPTER_STAGED, sha, "support-bot@1", str(tenant_b[0].pk)),
        (ControlEvent.ADAPTER_STAGED, sha, f"bad@{after['version']}", str(tenant_a[0].pk)),
    }


def after_pk(body) -> int:
    return AdapterVersion.objects.get(adapter__name=body["adapter"], number=body["version"], adapter__tenant__slug="tenant-a").pk
