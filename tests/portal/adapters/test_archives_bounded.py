"""The archive reader refuses hostile archives in bounded time and memory, and still reads what tarfile and zipfile write."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from engine_daemon.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from portal.adapters.archives import ArchiveLimits, extract_adapter_archive
from tests.portal.adapters import hostile_archives
from tests.portal.adapters.bad_uploads import BadUpload, Sources
from tests.portal.adapters.hostile_archives import (
    MIB,
    gzip_with_zeros,
    pax_header,
    pax_record,
    tar_file,
    tar_header,
)
from tests.portal.peft_files import tar_folder, zip_folder

MAX_SECONDS = 5.0
MAX_PEAK_BYTES = 16 * MIB


def limits_for(case_settings: dict) -> ArchiveLimits:
    def setting(name: str) -> int:
        return case_settings.get(name, getattr(settings, name))

    return ArchiveLimits(
        max_members=setting("LORAFLEET_ARCHIVE_MAX_MEMBERS"),
        max_uncompressed_bytes=setting("LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES"),
        max_ratio=setting("LORAFLEET_ARCHIVE_MAX_RATIO"),
    )


def written(case: BadUpload, sources: Sources) -> Path:
    ((name, data),) = case.build(sources).values()
    path = sources.tmp / name
    path.write_bytes(data)
    return path


def hostile(case_id: str) -> BadUpload:
    return next(case for case in hostile_archives.CASES if case.id == case_id)


@pytest.mark.parametrize("case", hostile_archives.CASES, ids=lambda case: case.id)
def test_hostile_archive_is_refused_fast_in_bounded_memory(case: BadUpload, bad_sources: Sources, tmp_path: Path):
    archive = written(case, bad_sources)
    dest = tmp_path / "out"
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(AdapterError) as refused:
            extract_adapter_archive(archive, dest, limits=limits_for(case.settings))
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert case.expect in str(refused.value), str(refused.value)
    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f} s"
    assert peak < MAX_PEAK_BYTES, f"peak {peak / MIB:.1f} MiB"
    assert not dest.exists()


def test_the_bombs_are_real_for_the_standard_library_alone(bad_sources: Sources):
    """Without the walks, tarfile holds a whole PAX record and zipfile builds an entry per hidden header."""
    pax_bomb = written(hostile("tar-pax-header-bomb"), bad_sources)
    tracemalloc.start()
    try:
        with tarfile.open(pax_bomb, mode="r:gz") as bundle:
            bundle.next()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 64 * MIB
    with zipfile.ZipFile(written(hostile("zip-end-record-hides-entries"), bad_sources)) as bundle:
        assert len(bundle.infolist()) == 100_002


# --- what real tools write still extracts


def _gettar(
    peft_dir: Path, target: Path, *, folder: str, tar_format: int, mtime: float | None = None,
    pax_headers: dict[str, str] | None = None,
) -> Path:
    with tarfile.open(target, "w:gz", format=tar_format, pax_headers=pax_headers or {}) as bundle:
        for path in sorted(peft_dir.iterdir()):
            info = bundle.gettarinfo(path, arcname=f"{folder}/{path.name}")
            if mtime is not None:
                info.mtime = mtime
            with path.open("rb") as data:
                bundle.addfile(info, data)
    return target


def _pax_non_ascii(peft_dir: Path, target: Path) -> Path:
    return _gettar(peft_dir, target, folder="adaptér-ü", tar_format=tarfile.PAX_FORMAT, mtime=1_700_000_000.25)


def _pax_global_header(peft_dir: Path, target: Path) -> Path:
    return _gettar(peft_dir, target, folder="my-adapter", tar_format=tarfile.PAX_FORMAT, pax_headers={"comment": "by hand"})


def _pax_long_path(peft_dir: Path, target: Path) -> Path:
    return _gettar(peft_dir, target, folder="/".join(["deep" * 50] * 40), tar_format=tarfile.PAX_FORMAT)


def _gnu_long_name(peft_dir: Path, target: Path) -> Path:
    return _gettar(peft_dir, target, folder="a-rather-long-folder-name-" * 12, tar_format=tarfile.GNU_FORMAT)


def _pax_size_record(peft_dir: Path, target: Path) -> Path:
    """The size in a PAX record and 0 in the header block, as tarfile writes members past 8 GiB."""
    config, weights = (peft_dir / CONFIG_FILE).read_bytes(), (peft_dir / WEIGHTS_FILE).read_bytes()
    sized = pax_header(pax_record("size", str(len(config)))) + tar_header(f"my-adapter/{CONFIG_FILE}", tarfile.REGTYPE, 0)
    raw = sized + config + bytes(-len(config) % tarfile.BLOCKSIZE) + tar_file(f"my-adapter/{WEIGHTS_FILE}", weights)
    target.write_bytes(gzip.compress(raw + bytes(2 * tarfile.BLOCKSIZE)))
    return target


def _trailing_zero_gibibyte(peft_dir: Path, target: Path) -> Path:
    """A gibibyte of zeros after the end of the archive; nothing reads past the end."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as bundle:
        for path in sorted(peft_dir.iterdir()):
            bundle.add(path, arcname=f"my-adapter/{path.name}")
    target.write_bytes(gzip_with_zeros(raw.getvalue(), 1 << 30))
    return target


def _zip_with_comment(peft_dir: Path, target: Path) -> Path:
    zip_folder(peft_dir, target, prefix="my-adapter/")
    with zipfile.ZipFile(target, "a") as bundle:
        bundle.comment = b"made by hand"
    return target


GOOD_ARCHIVES = {
    "zip": lambda peft_dir, target: zip_folder(peft_dir, target, prefix="my-adapter/"),
    "zip-with-comment": _zip_with_comment,
    "tar-pax-record-per-member": lambda peft_dir, target: tar_folder(peft_dir, target, prefix="my-adapter/"),
    "tar-pax-non-ascii-float-mtime": _pax_non_ascii,
    "tar-pax-global-header": _pax_global_header,
    "tar-pax-long-path": _pax_long_path,
    "tar-gnu-long-name": _gnu_long_name,
    "tar-pax-size-record": _pax_size_record,
    "tar-trailing-zero-gibibyte": _trailing_zero_gibibyte,
}


@pytest.mark.parametrize("kind", GOOD_ARCHIVES)
def test_archives_that_real_tools_write_still_extract(kind: str, peft_dir: Path, tmp_path: Path):
    suffix = ".zip" if kind.startswith("zip") else ".tar.gz"
    archive = GOOD_ARCHIVES[kind](peft_dir, tmp_path / f"adapter{suffix}")
    dest = tmp_path / "out"
    started = time.monotonic()
    extract_adapter_archive(archive, dest, limits=limits_for({}))
    assert time.monotonic() - started < MAX_SECONDS
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (dest / name).read_bytes() == (peft_dir / name).read_bytes()


@pytest.mark.parametrize(("kind", "record"), [
    ("tar-pax-non-ascii-float-mtime", tarfile.XHDTYPE),
    ("tar-pax-global-header", tarfile.XGLTYPE),
    ("tar-pax-long-path", tarfile.XHDTYPE),
    ("tar-gnu-long-name", tarfile.GNUTYPE_LONGNAME),
])
def test_the_good_tars_carry_the_header_records_they_are_named_for(kind, record, peft_dir: Path, tmp_path: Path):
    raw = gzip.decompress(GOOD_ARCHIVES[kind](peft_dir, tmp_path / "adapter.tar.gz").read_bytes())
    blocks = [raw[at : at + tarfile.BLOCKSIZE] for at in range(0, len(raw), tarfile.BLOCKSIZE)]
    assert any(block[156:157] == record and tarfile.nti(block[148:156]) in tarfile.calc_chksums(block) for block in blocks)
