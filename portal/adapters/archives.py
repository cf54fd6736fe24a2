"""Untrusted archives in, two PEFT files out.

What the portal checks before ``engine_daemon.peft_format`` sees a byte: the archive type (by
its magic bytes, not its name), member count, declared and actual uncompressed sizes, the
compression ratio, and every member's name and type (absolute or ``..`` paths, links, devices,
sparse files, nested archives, pickles). Only ``adapter_config.json`` and
``adapter_model.safetensors`` are ever written out, under fixed names, so a member's path never
becomes a path on disk.

Neither ``zipfile`` nor ``tarfile`` is handed an archive until its index has been walked here in
bounded reads, because both trust it: zipfile reads central-directory entries until the end
record's directory *size* is used up, whatever its entry count says, and tarfile reads a PAX or
GNU long-name header record whole into memory. So a zip's end record is checked against the
directory it points to, and a tar's header blocks are followed through the decompressed stream
(records of at most ``MAX_TAR_HEADER_BYTES``, at most ``MAX_TAR_HEADER_RECORDS`` of them) to where
tarfile will stop, before either library parses a byte.
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
# A PAX or GNU long-name record holds a path and a few attributes; tarfile reads one whole.
MAX_TAR_HEADER_BYTES = 64 << 10
# Header records in one tar: one per member is usual (tarfile writes a PAX record for a float mtime).
MAX_TAR_HEADER_RECORDS = 64

_ZIP_END = b"PK\x05\x06"
_ZIP_MAGIC = (b"PK\x03\x04", _ZIP_END)
_ZIP_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_ZIP_DIR_ENTRY = b"PK\x01\x02"
_ZIP_DIR_ENTRY_SIZE = 46
_ZIP_DIR_ENTRY_MAX = _ZIP_DIR_ENTRY_SIZE + 3 * 0xFFFF  # name, extra field and comment at their longest
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_ENCRYPTED_FLAG = 0x1
_COPY_CHUNK = 1 << 20
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_HEADER_TYPES = (
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's own pattern, so both read the same records
_FIX_ZIP = "zip the folder that save_pretrained wrote (zip -r adapter.zip my-adapter/)"
_FIX_TAR_HEADERS = "archive the adapter folder with plain short names"


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
            _check_zip_directory(archive, limits)
            with zipfile.ZipFile(archive) as bundle:
                members = _checked(_zip_members(bundle), archive_bytes, limits)
                _extract_adapter(members, dest)
        else:
            _scan_tar_headers(archive, archive_bytes, limits)
            with tarfile.open(archive, mode="r:gz") as bundle:
                members = _checked(_tar_members(bundle), archive_bytes, limits)
                _extract_adapter(members, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise AdapterError(f"the {kind} archive is corrupt or truncated ({exc}); create it again and re-upload") from None
    except NotImplementedError as exc:  # a zip compression method the standard library does not read
        raise AdapterError(f"the zip archive uses an unsupported compression ({exc}); {_FIX_ZIP}") from None


def _check_zip_directory(path: Path, limits: ArchiveLimits) -> None:
    """Hold the end record and the central directory to each other before zipfile reads the directory.

    zipfile finds the end record as ``_zip_end_record`` does, then reads the ``size`` bytes before
    it and builds an entry for every header in them, whatever the record's entry count says.
    """
    with path.open("rb") as stream:
        file_size = stream.seek(0, 2)
        end_at, end = _zip_end_record(stream, file_size)
        _, _, _, entries_here, entries, dir_size, dir_offset, comment_size = struct.unpack("<4s4H2LH", end)
        after_end = file_size - end_at - _ZIP_END_SIZE
        if comment_size != after_end:
            raise AdapterError(
                f"the zip archive's end record claims a {comment_size}-byte comment but {after_end} bytes follow it; "
                f"trailing bytes and hidden end records are refused: {_FIX_ZIP}"
            )
        stream.seek(max(end_at - _ZIP64_LOCATOR_SIZE, 0))
        has_zip64_locator = end_at >= _ZIP64_LOCATOR_SIZE and stream.read(4) == _ZIP64_LOCATOR
        if has_zip64_locator or 0xFFFF in (entries_here, entries) or 0xFFFFFFFF in (dir_size, dir_offset):
            raise AdapterError(
                f"the zip archive has zip64 end records, which only archives past 4 GiB or 65535 entries need; {_FIX_ZIP}"
            )
        if entries > limits.max_members:
            raise _too_many_members(limits)
        if dir_offset + dir_size > end_at:
            raise AdapterError(
                f"the zip archive's central directory ({dir_size} bytes at byte {dir_offset}) runs past its end record "
                f"at byte {end_at}; the archive is truncated or crafted: {_FIX_ZIP}"
            )
        max_dir_size = limits.max_members * _ZIP_DIR_ENTRY_MAX
        if dir_size > max_dir_size:
            raise AdapterError(
                f"the zip archive's central directory is {dir_size} bytes, past the {max_dir_size} bytes that "
                f"{limits.max_members} members can fill; {_FIX_ZIP}"
            )
        found = _zip_directory_entries(stream, end_at - dir_size, dir_size, limits.max_members + 1)
    if found != entries:
        holds = f"more than {limits.max_members}" if found > limits.max_members else str(found)
        raise AdapterError(
            f"the zip archive's end record counts {entries} entries but its central directory holds {holds}; "
            f"the archive is damaged or crafted: {_FIX_ZIP}"
        )


def _zip_end_record(stream: IO[bytes], file_size: int) -> tuple[int, bytes]:
    """The end record zipfile will use, found the way zipfile finds it, and the byte where it starts."""
    if file_size >= _ZIP_END_SIZE:
        stream.seek(file_size - _ZIP_END_SIZE)
        last = stream.read(_ZIP_END_SIZE)
        if last[:4] == _ZIP_END and last[-2:] == b"\0\0":
            return file_size - _ZIP_END_SIZE, last
    tail_start = max(file_size - (1 << 16) - _ZIP_END_SIZE, 0)
    stream.seek(tail_start)
    tail = stream.read()
    at = tail.rfind(_ZIP_END)
    if at < 0 or at + _ZIP_END_SIZE > len(tail):
        raise AdapterError(f"the zip archive has no end record; it is truncated or not a zip; {_FIX_ZIP}")
    return tail_start + at, tail[at : at + _ZIP_END_SIZE]


def _zip_directory_entries(stream: IO[bytes], start: int, size: int, stop_at: int) -> int:
    """How many entry headers fill the ``size`` bytes at ``start``, as zipfile will read them; counting stops at ``stop_at``."""
    found = used = 0
    while used < size and found < stop_at:
        stream.seek(start + used)
        entry = stream.read(_ZIP_DIR_ENTRY_SIZE)
        if used + _ZIP_DIR_ENTRY_SIZE > size or len(entry) != _ZIP_DIR_ENTRY_SIZE or entry[:4] != _ZIP_DIR_ENTRY:
            raise zipfile.BadZipFile(f"central directory entry {found} at byte {start + used} is not an entry header")
        name_len, extra_len, comment_len = struct.unpack_from("<3H", entry, 28)
        used += _ZIP_DIR_ENTRY_SIZE + name_len + extra_len + comment_len
        found += 1
    if found < stop_at and used != size:
        raise zipfile.BadZipFile(f"the central directory's last entry runs {used - size} bytes past its end")
    return found


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


def _scan_tar_headers(path: Path, archive_bytes: int, limits: ArchiveLimits) -> None:
    """Follow the tar's header blocks through the decompressed stream, reading member data in bounded chunks.

    tarfile reads each PAX or GNU long-name record into memory in one call before ``_checked`` sees
    the member it describes, so the records are capped here first. The walk goes where tarfile
    will go (a PAX ``size`` record moves the next member's end) and stops where tarfile stops.
    """
    max_read = (  # every member's data, and each header block with its padding
        limits.max_uncompressed_bytes
        + (limits.max_members + MAX_TAR_HEADER_RECORDS + 1) * 2 * _TAR_BLOCK
        + MAX_TAR_HEADER_RECORDS * MAX_TAR_HEADER_BYTES
    )
    members = records = total = 0
    global_pax: dict[bytes, bytes] = {}
    pax_size: int | None = None  # the next member's size, where a PAX record gives it
    with gzip.open(path, "rb") as raw:
        stream = _BoundedStream(raw, max_read, limits)
        while (header := _tar_header(stream.read(_TAR_BLOCK))) is not None:
            kind, size, name = header
            if size < 0:
                raise tarfile.ReadError(f"the header at byte {stream.consumed - _TAR_BLOCK} declares a negative size")
            if kind == tarfile.GNUTYPE_SPARSE:
                raise _sparse_member(name)
            if kind in _TAR_HEADER_TYPES:
                records += 1
                if records > MAX_TAR_HEADER_RECORDS:
                    raise AdapterError(
                        f"the archive carries more than {MAX_TAR_HEADER_RECORDS} PAX or GNU long-name header records, "
                        f"far more than an adapter folder needs; {_FIX_TAR_HEADERS}"
                    )
                if size > MAX_TAR_HEADER_BYTES:
                    raise AdapterError(
                        f"archive member header of {size} bytes (a PAX or GNU long-name record) is past the "
                        f"{MAX_TAR_HEADER_BYTES}-byte limit; {_FIX_TAR_HEADERS}"
                    )
                data = stream.read_exactly(_tar_padded(size))[:size]
                if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE):
                    pax = _pax_records(data)
                    if any(key.startswith(b"GNU.sparse.") for key in pax):
                        raise _sparse_member(pax.get(b"path", b"").decode("utf-8", "replace"))
                    if kind == tarfile.XGLTYPE:
                        global_pax.update(pax)
                    elif pax_size is None and (size_record := pax.get(b"size", global_pax.get(b"size"))) is not None:
                        pax_size = _pax_int(size_record)  # of several extended headers, tarfile applies the first's size
                continue
            members += 1
            if members > limits.max_members:
                raise _too_many_members(limits)
            if pax_size is not None:
                size, pax_size = pax_size, None
                if size < 0:
                    raise tarfile.ReadError(f"a PAX record gives member {name!r} a negative size")
            total += size
            _check_total(total, archive_bytes, limits)
            if kind in tarfile.REGULAR_TYPES or kind not in tarfile.SUPPORTED_TYPES:  # as tarfile skips data
                stream.skip(_tar_padded(size))


class _BoundedStream:
    """A decompressed stream read in pieces of at most ``_COPY_CHUNK``, refused past ``max_bytes`` in all."""

    def __init__(self, raw: IO[bytes], max_bytes: int, limits: ArchiveLimits) -> None:
        self.raw, self.max_bytes, self.limits = raw, max_bytes, limits
        self.consumed = 0

    def read(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.consumed += len(data)
        if self.consumed > self.max_bytes:
            raise _expands_too_far(self.limits)
        return data

    def read_exactly(self, size: int) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def skip(self, size: int) -> None:
        while size:
            size -= len(self.read_exactly(min(size, _COPY_CHUNK)))


def _tar_header(block: bytes) -> tuple[bytes, int, str] | None:
    """(type, size, name) of a header block, or None where tarfile ends the archive: EOF, a zero block, a bad header."""
    if len(block) != _TAR_BLOCK or block.count(0) == _TAR_BLOCK:
        return None
    try:
        if tarfile.nti(block[148:156]) not in tarfile.calc_chksums(block):
            return None
        size = tarfile.nti(block[124:136])
    except tarfile.HeaderError:
        return None
    name = block[:100].split(b"\0", 1)[0]
    kind = block[156:157]
    if kind == tarfile.AREGTYPE and name.endswith(b"/"):  # tarfile reads an old-style directory so
        kind = tarfile.DIRTYPE
    return kind, size, name.decode("utf-8", "replace")


def _tar_padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """A PAX header's keyword → value, parsed as tarfile parses it."""
    records: dict[bytes, bytes] = {}
    at = 0
    while match := _PAX_RECORD.match(data, at):
        digits, keyword = match.groups()
        length = int(digits) if len(digits) <= 20 else 0  # tarfile's int() would raise past 4300 digits
        if length == 0:
            raise tarfile.ReadError(f"a PAX record has a length of {digits[:20].decode()}")
        records[keyword] = data[match.end(2) + 1 : match.start(1) + length - 1]
        at += length
    return records


def _pax_int(value: bytes) -> int:
    try:
        return int(value.decode("utf-8", "replace"))
    except ValueError:  # tarfile reads a number it cannot parse as 0
        return 0


def _sparse_member(name: str) -> AdapterError:
    return AdapterError(
        f"archive member {name!r} is stored as a GNU sparse file; archive the adapter folder without tar --sparse (-S)"
    )


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
    for member in members:
        if len(checked) >= limits.max_members:
            raise _too_many_members(limits)
        _check_member_name(member)
        total += member.size
        _check_total(total, archive_bytes, limits)
        checked.append(member)
    return checked


def _check_total(total: int, archive_bytes: int, limits: ArchiveLimits) -> None:
    """The members' declared sizes so far, against the size limit and the compression ratio."""
    if total > limits.max_uncompressed_bytes:
        raise _expands_too_far(limits)
    if total > limits.max_ratio * archive_bytes:
        raise AdapterError(
            f"the archive's compression ratio is past {limits.max_ratio}:1, which real adapter weights never reach; "
            "it looks like a decompression bomb: archive the adapter folder as it is"
        )


def _expands_too_far(limits: ArchiveLimits) -> AdapterError:
    return AdapterError(
        f"the archive expands to more than {limits.max_uncompressed_bytes} bytes "
        "(LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES); archive only the adapter folder"
    )


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
