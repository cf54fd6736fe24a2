"""Every bad upload is rejected with its own message naming the fix, and nothing reaches the cache."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.adapters import services
from portal.adapters.models import AdapterVersion
from portal.adapters.uploads import AdapterUpload
from tests.portal.adapters import hostile_archives, hostile_weights
from tests.portal.adapters.bad_uploads import BadUpload
from tests.portal.adapters.bad_uploads import CORPUS as BASIC_CORPUS

CORPUS = BASIC_CORPUS + hostile_archives.CASES + hostile_weights.CASES

pytestmark = pytest.mark.django_db


def as_upload(parts: dict) -> AdapterUpload:
    return AdapterUpload(**{field: SimpleUploadedFile(name, data) for field, (name, data) in parts.items()})


def test_the_corpus_is_large_and_every_message_is_its_own():
    assert len(CORPUS) >= 20
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    for case in CORPUS:
        others = [other.id for other in CORPUS if other is not case and case.expect in other.expect]
        # a case may share its words only with a sibling of the same kind (a zip and a tar link)
        assert all(other.split("-")[-1] == case.id.split("-")[-1] for other in others), (case.id, others)


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.id)
def test_bad_upload_is_rejected_with_its_message(case: BadUpload, tenant_a, base_model, bad_sources, run_on_commit, settings):
    for name, value in case.settings.items():
        setattr(settings, name, value)
    with run_on_commit():
        version = services.adapter_create(
            tenant=tenant_a[0], name="bad", base_model=base_model, upload=as_upload(case.build(bad_sources))
        )
    version.refresh_from_db()
    assert version.status == AdapterVersion.Status.REJECTED
    assert case.expect in version.error, version.error
    assert version.sha256 == "" and version.adapter.default_version is None
    cache = settings.ADAPTER_CACHE_DIR
    left = [p for p in cache.rglob("*") if p.name != ".validated"] if cache.exists() else []
    assert left == [], "a rejected upload left files in the adapter cache"
