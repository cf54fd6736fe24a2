"""Every bad upload is rejected with its own message naming the fix, and nothing reaches the cache.

Each is checked in the real validation child under the default limits, and refused fast and small:
within a few seconds, with the child's peak memory under a bound far below the default limit.
"""

import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from portal.adapters import sandbox, services, staging
from portal.adapters.models import AdapterVersion
from portal.adapters.uploads import AdapterUpload
from tests.portal.adapters import hostile_archives, hostile_configs, hostile_weights
from tests.portal.adapters.bad_uploads import CORPUS as BASIC_CORPUS
from tests.portal.adapters.bad_uploads import BadUpload

CORPUS = BASIC_CORPUS + hostile_archives.CASES + hostile_weights.CASES + hostile_configs.CASES

pytestmark = pytest.mark.django_db

SECONDS_PER_CASE = 20  # the slowest case is a pattern key's 2 s matching budget, plus the child's start
PEAK_RSS_BYTES = 200 << 20  # the interpreter and numpy are ~50 MiB; the default limit is 1 GiB more


def as_upload(parts: dict) -> AdapterUpload:
    return AdapterUpload(**{field: SimpleUploadedFile(name, data) for field, (name, data) in parts.items()})


def test_the_corpus_is_large_and_every_message_is_its_own():
    assert len(CORPUS) >= 35 + len(BASIC_CORPUS)
    assert len({case.id for case in CORPUS}) == len(CORPUS)
    for case in CORPUS:
        others = [other.id for other in CORPUS if other is not case and case.expect in other.expect]
        # a case may share its words only with a sibling of the same kind (a zip and a tar link)
        assert all(other.split("-")[-1] == case.id.split("-")[-1] for other in others), (case.id, others)


def recording_peaks(peaks: list[int]):
    """The real sandbox, with each run's peak memory noted (refusals carry it too)."""

    def validate(job, limits):
        try:
            result = sandbox.validate_in_child(job, limits)
        except sandbox.UploadRefused as exc:
            peaks.append(exc.peak_rss_bytes)
            raise
        peaks.append(result.peak_rss_bytes)
        return result

    return validate


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: case.id)
def test_bad_upload_is_rejected_with_its_message(
    case: BadUpload, tenant_a, base_model, bad_sources, run_on_commit, settings, monkeypatch
):
    for name, value in case.settings.items():
        setattr(settings, name, value)
    upload = as_upload(case.build(bad_sources))
    peaks = []
    monkeypatch.setattr(staging, "validate_in_child", recording_peaks(peaks))
    started = time.monotonic()
    with run_on_commit():
        version = services.adapter_create(tenant=tenant_a[0], name="bad", base_model=base_model, upload=upload)
    assert time.monotonic() - started < SECONDS_PER_CASE
    assert all(peak < PEAK_RSS_BYTES for peak in peaks), peaks
    version.refresh_from_db()
    assert version.status == AdapterVersion.Status.REJECTED
    assert case.expect in version.error, version.error
    assert version.sha256 == "" and version.adapter.default_version is None
    cache = settings.ADAPTER_CACHE_DIR
    left = [p for p in cache.rglob("*") if p.name != ".validated"] if cache.exists() else []
    assert left == [], "a rejected upload left files in the adapter cache"
