"""Files and events behind the adapter services: checking an upload, and the shared adapter cache.

The cache (``ADAPTER_CACHE_DIR``) is content-addressed: ``<sha256>/`` holds
``adapter_config.json``, ``adapter_model.safetensors`` and ``manifest.json``. Everything is
first written into a hidden temporary directory inside the cache and renamed into place, so a
reader (the engine) never sees half a directory. Hidden directories hold work in progress:
``.validated/<version id>/`` keeps a validated upload until it is staged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from engine_daemon.peft_format import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterError,
    adapter_content_sha256,
    cached_adapter_dir,
)
from engine_daemon.protocol import CONTROL_STREAM, PINNED_ADAPTERS_KEY, ControlEvent
from portal.adapters.archives import ArchiveLimits
from portal.adapters.models import AdapterVersion
from portal.adapters.sandbox import ValidationJob, ValidationLimits, ValidationResult, validate_in_child
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


def validation_limits() -> ValidationLimits:
    return ValidationLimits(
        memory_bytes=settings.LORAFLEET_VALIDATION_MAX_MEMORY_BYTES,
        cpu_seconds=settings.LORAFLEET_VALIDATION_CPU_SECONDS,
        wall_seconds=settings.LORAFLEET_VALIDATION_WALL_SECONDS,
    )


def upload_check_in_child(*, version: AdapterVersion, dest: Path) -> ValidationResult:
    """Write the version's upload into ``dest`` as the two PEFT files and check them, in the sandbox."""
    job = ValidationJob(
        dest=str(dest),
        base=version.adapter.base_model.model_descriptor.to_dict(),
        max_lora_rank=settings.LORAFLEET_MAX_LORA_RANK,
        archive_limits=dataclasses.asdict(archive_limits()),
        archive=version.archive.path if version.archive else None,
        config=version.config_file.path if version.config_file else None,
        weights=version.weights_file.path if version.weights_file else None,
        weights_name=version.original_filenames.get("adapter_model", WEIGHTS_FILE),
    )
    return validate_in_child(job, validation_limits())


def validated_dir(version_id: int) -> Path:
    return cache_root() / ".validated" / str(version_id)


def upload_validate(*, version: AdapterVersion) -> ValidationResult:
    """Materialize and check an upload in the sandbox; keep the checked files in validated_dir for staging.

    Raises AdapterError with the reason for the uploader (a limit that was hit included).
    """
    with _scratch_dir(".validating-") as scratch:
        result = upload_check_in_child(version=version, dest=scratch)
        target = validated_dir(version.pk)
        target.parent.mkdir(parents=True, exist_ok=True)
        _replace_dir(scratch, target)
    return result


def validated_dir_remove(version_id: int) -> None:
    shutil.rmtree(validated_dir(version_id), ignore_errors=True)


_WORK_DIR_PREFIXES = (".validating-", ".staging-", ".trash-")


def work_dirs_sweep(*, older_than_seconds: float, keep_validated: set[int]) -> list[Path]:
    """Remove work directories a killed worker left in the cache; returns what was removed.

    Scratch and trash directories go once older than any live run can be; ``.validated/<id>``
    goes unless ``id`` is in ``keep_validated`` (versions still between validation and staging).
    """
    root = cache_root()
    cutoff = time.time() - older_than_seconds
    stale = [p for p in root.iterdir() if p.name.startswith(_WORK_DIR_PREFIXES) and _mtime(p) < cutoff]
    validated = root / ".validated"
    if validated.is_dir():
        stale += [
            p for p in validated.iterdir()
            if not (p.name.isdigit() and int(p.name) in keep_validated) and _mtime(p) < cutoff
        ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another worker removed it meanwhile
        return float("inf")


# ---------------------------------------------------------------------------------------------
# The content-addressed cache


def cache_dir_is_complete(sha256: str) -> bool:
    folder = cached_adapter_dir(cache_root(), sha256)
    return all((folder / name).is_file() for name in _CACHE_FILES)


@contextlib.contextmanager
def cache_lock(sha256: str) -> Iterator[None]:
    """Serializes staging and purging of one cache entry across workers, and changes to its pin."""
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
            upload_check_in_child(version=version, dest=scratch)
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


def pinned_adapters() -> set[str]:
    return {member.decode() for member in redis_client().smembers(PINNED_ADAPTERS_KEY)}


def pinned_adapters_add(sha256: str) -> bool:
    """Whether ``sha256`` was new to the set. An engine that starts reads this set; the running ones hear of
    the change by a control event."""
    return bool(redis_client().sadd(PINNED_ADAPTERS_KEY, sha256))


def pinned_adapters_remove(sha256: str) -> bool:
    """Whether ``sha256`` was in the set."""
    return bool(redis_client().srem(PINNED_ADAPTERS_KEY, sha256))
