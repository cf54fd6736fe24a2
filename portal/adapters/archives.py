"""Untrusted archives in, two PEFT files out.

What the portal checks before ``engine_daemon.peft_format`` sees a byte: the archive type (by
its magic bytes, not its name), member count, declared and actual uncompressed sizes, the
compression ratio, and every member's name and type (absolute or ``..`` paths, links, devices,
nested archives, pickles). Only ``adapter_config.json`` and ``adapter_model.safetensors`` are
ever written out, under fixed names, so a member's path never becomes a path on disk.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engine_daemon.peft_format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterError

NESTED_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".tgz", ".gz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".lz4", ".7z", ".rar", ".whl", ".jar",
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_ENCRYPTED_FLAG = 0x1
_COPY_CHUNK = 1 << 20
_FIX_ZIP = "zip the folder that save_pretrained wrote (zip -r adapter.zip my-adapter/)"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_uncompressed_bytes: int
    max_ratio: int


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    is_dir: bool
    opener: Callable[[], IO[bytes]]


def archive_kind(path: Path) -> str:
    """'zip' or 'tar.gz', from the first bytes; the file name is not trusted."""
    with path.open("rb") as stream:
        head = stream.read(4)
    if head in _ZIP_MAGIC:
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        return "tar.gz"
    raise AdapterError(
        "the archive is neither a .zip nor a .tar.gz file; upload a .zip or .tar.gz of the adapter folder, "
        f"or {CONFIG_FILE} and {WEIGHTS_FILE} as two separate files"
    )


def extract_adapter_archive(archive: Path, dest: Path, *, limits: ArchiveLimits) -> None:
    """Check every member of ``archive``, then write the adapter's two files into ``dest``."""
    kind = archive_kind(archive)
    archive_bytes = max(archive.stat().st_size, 1)
    try:
        if kind == "zip":
            _check_zip_entry_count(archive, limits)
            with zipfile.ZipFile(archive) as bundle:
                members = _checked(_zip_members(bundle), archive_bytes, limits)
                _extract_adapter(members, dest)
        else:
            with tarfile.open(archive, mode="r:gz") as bundle:
                members = _checked(_tar_members(bundle), archive_bytes, limits)
                _extract_adapter(members, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise AdapterError(f"the {kind} archive is corrupt or truncated ({exc}); create it again and re-upload") from None
    except NotImplementedError as exc:  # a zip compression method the standard library does not read
        raise AdapterError(f"the zip archive uses an unsupported compression ({exc}); {_FIX_ZIP}") from None


def _check_zip_entry_count(path: Path, limits: ArchiveLimits) -> None:
    """Read the entry count from the end record before zipfile loads the whole central directory."""
    with path.open("rb") as stream:
        stream.seek(0, 2)
        size = stream.tell()
        tail_len = min(size, 22 + 0xFFFF)
        stream.seek(size - tail_len)
        tail = stream.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise AdapterError(f"the zip archive has no end record; it is truncated or not a zip; {_FIX_ZIP}")
    (entries,) = struct.unpack("<H", tail[at + 10 : at + 12])
    if entries > limits.max_members:  # 0xFFFF (zip64) counts as too many, as it must be
        raise _too_many_members(limits)


def _too_many_members(limits: ArchiveLimits) -> AdapterError:
    return AdapterError(
        f"the archive has more than {limits.max_members} members; an adapter folder needs only "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}: archive just that folder"
    )


def _zip_members(bundle: zipfile.ZipFile) -> Iterator[_Member]:
    for info in bundle.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise AdapterError(f"archive member {info.filename!r} is a symbolic link; links are refused, archive real files")
        if info.flag_bits & _ZIP_ENCRYPTED_FLAG:
            raise AdapterError(f"archive member {info.filename!r} is encrypted; upload an archive without a password")
        yield _Member(info.filename, info.file_size, info.is_dir(), lambda info=info: bundle.open(info))


def _tar_members(bundle: tarfile.TarFile) -> Iterator[_Member]:
    # next() skips the previous member's data, so a member's declared size is checked before any of it is read.
    while (info := bundle.next()) is not None:
        if info.issym() or info.islnk():
            raise AdapterError(
                f"archive member {info.name!r} is a {'symbolic' if info.issym() else 'hard'} link; "
                "links are refused, archive real files"
            )
        if not (info.isfile() or info.isdir()):
            raise AdapterError(
                f"archive member {info.name!r} is a device, FIFO or other special file; archive regular files only"
            )
        yield _Member(info.name, info.size, info.isdir(), lambda info=info: bundle.extractfile(info))


def _checked(members: Iterator[_Member], archive_bytes: int, limits: ArchiveLimits) -> list[_Member]:
    """Every member's name and the running totals, checked as the listing streams in."""
    checked: list[_Member] = []
    total = 0
    max_total = min(limits.max_uncompressed_bytes, limits.max_ratio * archive_bytes)
    for member in members:
        if len(checked) >= limits.max_members:
            raise _too_many_members(limits)
        _check_member_name(member)
        total += member.size
        if total > max_total:
            if total > limits.max_uncompressed_bytes:
                raise AdapterError(
                    f"the archive expands to more than {limits.max_uncompressed_bytes} bytes "
                    "(LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES); archive only the adapter folder"
                )
            raise AdapterError(
                f"the archive's compression ratio is past {limits.max_ratio}:1, which real adapter weights never reach; "
                "it looks like a decompression bomb: archive the adapter folder as it is"
            )
        checked.append(member)
    return checked


def _check_member_name(member: _Member) -> None:
    name = member.name
    normalized = name.replace("\\", "/")
    if "\x00" in name:
        raise AdapterError(f"archive member {name!r} has a NUL byte in its name")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise AdapterError(f"archive member {name!r} has an absolute path; archive paths must be relative")
    if ".." in normalized.split("/"):
        raise AdapterError(f"archive member {name!r} climbs out of the archive with '..'; archive paths must stay inside")
    if member.is_dir:
        return
    lowered = normalized.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        raise AdapterError(
            f"{posixpath.basename(normalized)} is a pickle, which can run code when loaded and is never read; "
            "save the adapter with save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
        )
    if lowered.endswith(NESTED_ARCHIVE_SUFFIXES):
        raise AdapterError(f"archive member {name!r} is itself an archive; nested archives are refused, {_FIX_ZIP}")


def _extract_adapter(members: list[_Member], dest: Path) -> None:
    files = [m for m in members if not m.is_dir]
    configs = [m for m in files if posixpath.basename(m.name.replace("\\", "/")) == CONFIG_FILE]
    if not configs:
        raise AdapterError(f"the archive holds no {CONFIG_FILE}; {_FIX_ZIP}")
    if len(configs) > 1:
        raise AdapterError(
            f"the archive holds {len(configs)} adapters ({', '.join(m.name for m in configs)}); upload one adapter per archive"
        )
    folder = posixpath.dirname(configs[0].name.replace("\\", "/"))
    weights_name = posixpath.join(folder, WEIGHTS_FILE) if folder else WEIGHTS_FILE
    weights = [m for m in files if m.name.replace("\\", "/") == weights_name]
    if not weights:
        raise AdapterError(
            f"{WEIGHTS_FILE} is missing next to {configs[0].name} in the archive; "
            "save the adapter with save_pretrained(..., safe_serialization=True) and archive that folder"
        )
    dest.mkdir(parents=True, exist_ok=True)
    _copy_member(configs[0], dest / CONFIG_FILE)
    _copy_member(weights[0], dest / WEIGHTS_FILE)


def _copy_member(member: _Member, target: Path) -> None:
    """Stream one member out, refusing any byte past its declared size (the limits were checked on those)."""
    written = 0
    with member.opener() as source, target.open("wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            written += len(chunk)
            if written > member.size:
                raise AdapterError(f"archive member {member.name!r} holds more bytes than its header declares; the archive is corrupt")
            out.write(chunk)
    if written != member.size:
        raise AdapterError(f"archive member {member.name!r} is truncated; the archive is corrupt")
