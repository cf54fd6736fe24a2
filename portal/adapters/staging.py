"""Files and events behind the adapter services: checking an upload, and the shared adapter cache.

The cache (``ADAPTER_CACHE_DIR``) is content-addressed: ``<sha256>/`` holds
``adapter_config.json``, ``adapter_model.safetensors`` and ``manifest.json``. Everything is
first written into a hidden temporary directory inside the cache and renamed into place, so a
reader (the engine) never sees half a directory. Hidden directories hold work in progress:
``.validated/<version id>/`` keeps a validated upload until it is staged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from engine_daemon.peft_format import (
    CONFIG_FILE,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    adapter_content_sha256,
    cached_adapter_dir,
)
from engine_daemon.protocol import CONTROL_STREAM, ControlEvent
from portal.adapters.archives import ArchiveLimits, extract_adapter_archive
from portal.adapters.checks import adapter_files_check, pickle_error
from portal.adapters.models import AdapterVersion
from portal.common.redis import redis_client

CONTROL_STREAM_MAXLEN = 10_000
_CACHE_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)


def cache_root() -> Path:
    root = Path(settings.ADAPTER_CACHE_DIR)
    root.mkdir(parents=True, exist_ok=True)
    return root


def archive_limits() -> ArchiveLimits:
    return ArchiveLimits(
        max_members=settings.LORAFLEET_ARCHIVE_MAX_MEMBERS,
        max_uncompressed_bytes=settings.LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES,
        max_ratio=settings.LORAFLEET_ARCHIVE_MAX_RATIO,
    )


@contextlib.contextmanager
def _scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory inside the cache (same filesystem, so renames out of it are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, first moving aside whatever is there."""
    if target.exists():
        aside = target.with_name(f".trash-{uuid.uuid4().hex}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(source, target)


# ---------------------------------------------------------------------------------------------
# From an upload to two checked files


def upload_materialize(*, version: AdapterVersion, dest: Path) -> None:
    """Write the version's upload into ``dest`` as adapter_config.json + adapter_model.safetensors."""
    if version.archive:
        extract_adapter_archive(Path(version.archive.path), dest, limits=archive_limits())
        return
    weights_name = version.original_filenames.get("adapter_model", WEIGHTS_FILE)
    if weights_name.lower().endswith(PICKLE_SUFFIXES):
        raise pickle_error(weights_name)
    shutil.copyfile(version.config_file.path, dest / CONFIG_FILE)
    shutil.copyfile(version.weights_file.path, dest / WEIGHTS_FILE)


def validated_dir(version_id: int) -> Path:
    return cache_root() / ".validated" / str(version_id)


def upload_validate(*, version: AdapterVersion) -> tuple[str, AdapterManifest]:
    """Materialize and check an upload; keep the checked files in validated_dir for staging.

    Returns (sha256, manifest). Raises AdapterError with the reason for the uploader.
    """
    base = version.adapter.base_model.model_descriptor
    with _scratch_dir(".validating-") as scratch:
        upload_materialize(version=version, dest=scratch)
        manifest = adapter_files_check(scratch, base, max_lora_rank=settings.LORAFLEET_MAX_LORA_RANK)
        sha256 = adapter_content_sha256(scratch / CONFIG_FILE, scratch / WEIGHTS_FILE)
        target = validated_dir(version.pk)
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_dir(scratch, target)
    return sha256, manifest


def validated_dir_remove(version_id: int) -> None:
    shutil.rmtree(validated_dir(version_id), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The content-addressed cache


def cache_dir_is_complete(sha256: str) -> bool:
    folder = cached_adapter_dir(cache_root(), sha256)
    return all((folder / name).is_file() for name in _CACHE_FILES)


@contextlib.contextmanager
def cache_lock(sha256: str) -> Iterator[None]:
    """Serializes staging and purging of one cache entry across workers."""
    with redis_client().lock(f"lf:lock:adapter-cache:{sha256}", timeout=600, blocking_timeout=120):
        yield


def cache_dir_stage(*, version: AdapterVersion) -> Path:
    """Make ``<cache>/<sha256>/`` complete for a validated version; a no-op when it already is."""
    sha256 = version.sha256
    final = cached_adapter_dir(cache_root(), sha256)
    if cache_dir_is_complete(sha256):
        return final
    source = validated_dir(version.pk)
    with _scratch_dir(".staging-") as scratch:
        if all((source / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                os.rename(source / name, scratch / name)
        else:  # the validated copy is gone (another worker, a cleanup): start again from the upload
            upload_materialize(version=version, dest=scratch)
        if adapter_content_sha256(scratch / CONFIG_FILE, scratch / WEIGHTS_FILE) != sha256:
            raise AdapterError("the uploaded files changed after validation; upload the adapter again")
        (scratch / MANIFEST_FILE).write_text(json.dumps(version.manifest, indent=2, sort_keys=True))
        for name in _CACHE_FILES:
            with (scratch / name).open("rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(scratch, 0o755)
        _replace_dir(scratch, final)
        _fsync_dir(final.parent)
    return final


def cache_dir_remove(sha256: str) -> bool:
    """Take ``<cache>/<sha256>/`` away (renamed aside first, so no reader sees it half deleted)."""
    final = cached_adapter_dir(cache_root(), sha256)
    if not final.exists():
        return False
    aside = final.with_name(f".trash-{uuid.uuid4().hex}")
    os.rename(final, aside)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Control events for the engines


def control_event_publish(event: ControlEvent) -> None:
    redis_client().xadd(CONTROL_STREAM, event.to_redis(), maxlen=CONTROL_STREAM_MAXLEN, approximate=True)
