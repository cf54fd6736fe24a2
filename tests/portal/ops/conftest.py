from __future__ import annotations

import pytest
from django.test import Client

from tests.engine.builders import write_adapter, write_tiny_model
from tests.portal import factories
from tests.portal.ops.fleet import start_fleet


@pytest.fixture(scope="session")
def ops_model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("ops") / "ops-tiny", with_tokenizer=True)


@pytest.fixture(scope="session")
def ops_adapter_dirs(ops_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ops-adapters")
    return [write_adapter(ops_model_dir, folder / f"adapter-{seed}", r=2, seed=seed) for seed in (1, 2, 3)]


@pytest.fixture
def staff(db):
    return factories.user_create("operator", is_staff=True)


@pytest.fixture
def staff_client(staff):
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def fleet(ops_model_dir, ops_adapter_dirs, tenant_a, tenant_b, redis_client, redis_url, run_on_commit):
    fleet = start_fleet(model_dir=ops_model_dir, adapter_dirs=ops_adapter_dirs, tenant_a=tenant_a[0],
                        tenant_b=tenant_b[0], redis_client=redis_client, redis_url=redis_url, run_on_commit=run_on_commit)
    yield fleet
    fleet.service.engine.close()
