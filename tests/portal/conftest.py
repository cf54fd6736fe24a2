"""Portal fixtures: each test gets its own media, cache and temp folders, and runs Celery tasks eagerly.

Good adapters are written by PEFT once per session (torch is imported only here, in tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.portal import factories
from tests.portal.peft_files import make_peft_adapter, zip_folder


@pytest.fixture(autouse=True)
def portal_settings(settings, tmp_path: Path, redis_url: str):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FILE_UPLOAD_TEMP_DIR = tmp_path / "upload-tmp"
    settings.FILE_UPLOAD_TEMP_DIR.mkdir()
    settings.ADAPTER_CACHE_DIR = tmp_path / "adapter-cache"
    settings.REDIS_URL = redis_url
    return settings


@pytest.fixture(autouse=True)
def eager_celery() -> Iterator[None]:
    """Tasks run in the caller when enqueued (tests of the real worker switch this off)."""
    from portal.celery import app

    saved = app.conf.task_always_eager, app.conf.task_eager_propagates
    app.conf.task_always_eager, app.conf.task_eager_propagates = True, True
    yield
    app.conf.task_always_eager, app.conf.task_eager_propagates = saved


@pytest.fixture(scope="session")
def peft_dir(tmp_path_factory) -> Path:
    """A good adapter (r=4 on q_proj and v_proj), as save_pretrained writes it."""
    return make_peft_adapter(tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture(scope="session")
def peft_dir_v2(tmp_path_factory) -> Path:
    """Another good adapter with other content (r=8 on every attention projection)."""
    return make_peft_adapter(
        tmp_path_factory.mktemp("peft2") / "adapter", r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1
    )


@pytest.fixture(scope="session")
def peft_zip(peft_dir: Path, tmp_path_factory) -> Path:
    return zip_folder(peft_dir, tmp_path_factory.mktemp("zips") / "adapter.zip", prefix="my-adapter/")


@pytest.fixture
def base_model(db):
    return factories.tiny_base_model()


@pytest.fixture
def tenant_a(db):
    return factories.tenant_with_member("tenant-a", username="alice")


@pytest.fixture
def tenant_b(db):
    return factories.tenant_with_member("tenant-b", username="bob")


@pytest.fixture
def run_on_commit(django_capture_on_commit_callbacks):
    """Run what a block enqueues after commit (the tasks, eagerly), as a real commit would."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


@pytest.fixture(scope="session")
def peft_pickled_dir(tmp_path_factory) -> Path:
    """The good adapter's twin saved with safe_serialization=False (adapter_model.bin)."""
    return make_peft_adapter(tmp_path_factory.mktemp("peft-bin") / "adapter", safe_serialization=False)


@pytest.fixture(scope="session")
def peft_other_base_dir(tmp_path_factory) -> Path:
    """An adapter trained on a Llama whose shapes are not random:tiny's."""
    other = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
    return make_peft_adapter(tmp_path_factory.mktemp("peft-other") / "adapter", llama=other)


@pytest.fixture
def bad_sources(peft_dir, peft_pickled_dir, peft_other_base_dir, tmp_path):
    from tests.portal.adapters.bad_uploads import Sources

    folder = tmp_path / "bad-upload"
    folder.mkdir()
    return Sources(good=peft_dir, pickled=peft_pickled_dir, other_base=peft_other_base_dir, tmp=folder)


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def key_client(tenant_a):
    """An API client of tenant A with a manage + inference key."""
    from rest_framework.test import APIClient

    _key, secret = factories.api_key_for(tenant_a[0])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client
