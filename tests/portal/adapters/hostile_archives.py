"""Hostile uploads aimed at the archives readers: each must be refused fast, in bounded memory, with its own words.

The header bombs are real: handed to ``tarfile`` alone, each makes it read tens of MiB into one
``bytes``, from an upload of tens of KiB (``test_archives_bounded`` checks one). A gzip file may
be many gzip members one after another, so one compressed mebibyte of zeros is repeated rather
than compressing the zeros again. The zips are built byte by byte around a good one.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from collections.abc import Callable

from tests.portal.adapters.bad_uploads import BadUpload, Parts, Sources, good_files

MIB = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_TAR_END = bytes(2 * _BLOCK)
_ZIP_END = struct.Struct("<4s4H2LH")
_ZIP_DIR_ENTRY = b"PK\x01\x02" + bytes(42)  # an entry with no name, extra field or comment


# --- tar.gz, block by block


def gzip_with_zeros(head: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """gzip of ``head``, ``zeros`` zero bytes and ``tail``, never holding the zeros uncompressed."""
    out = io.BytesIO()
    out.write(gzip.compress(head, mtime=0))
    whole, rest = divmod(zeros, MIB)
    compressed_mib = gzip.compress(bytes(MIB), compresslevel=9, mtime=0)
    for _ in range(whole):
        out.write(compressed_mib)
    out.write(gzip.compress(bytes(rest) + tail, mtime=0))
    return out.getvalue()


def tar_header(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte header block with a good checksum, whatever its type and size (GNU base-256 where needed)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def tar_file(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return tar_header(name, kind, len(data)) + data + bytes(-len(data) % _BLOCK)


def pax_record(keyword: str, value: str) -> bytes:
    body = f" {keyword}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax_header(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    return tar_file("././@PaxHeader", records, kind)


def good_tar_members(s: Sources) -> bytes:
    return b"".join(tar_file(name, data) for name, data in good_files(s))


def as_tar_gz(archive: bytes) -> Parts:
    return {"archive": ("adapter.tar.gz", archive)}


def header_bomb(kind: bytes, size: int) -> Callable[[Sources], Parts]:
    """A first header record of ``size`` bytes (all there, zeros), then the good adapter."""
    name = "././@LongLink" if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) else "././@PaxHeader"
    return lambda s: as_tar_gz(gzip_with_zeros(tar_header(name, kind, size), size, good_tar_members(s) + _TAR_END))


def _pax_size_hides_bomb(s: Sources) -> Parts:
    """A PAX size record gives a member 4096 bytes where its own header says 0; a bomb waits past them."""
    hiding = pax_header(pax_record("size", "4096")) + tar_header("my-adapter/notes.txt", tarfile.REGTYPE, 0)
    bomb = tar_header("././@PaxHeader", tarfile.XHDTYPE, 40 * MIB)
    return as_tar_gz(gzip_with_zeros(hiding + bytes(4096) + bomb, 40 * MIB, good_tar_members(s) + _TAR_END))


def _header_record_flood(s: Sources) -> Parts:
    records = pax_header(pax_record("comment", "x"), tarfile.XGLTYPE) * 65
    return as_tar_gz(gzip.compress(records + good_tar_members(s) + _TAR_END))


def _negative_size(s: Sources) -> Parts:
    """tarfile asks gzip for read(-1 MiB) for a header record of size -1 MiB; the ValueError escapes it."""
    head = tar_header("././@PaxHeader", tarfile.XHDTYPE, -MIB)
    return as_tar_gz(gzip_with_zeros(head, 16 * MIB, good_tar_members(s) + _TAR_END))


def _sparse_member(s: Sources) -> Parts:
    (config_name, config), (weights_name, weights) = good_files(s)
    members = tar_file(config_name, config) + tar_file(weights_name, weights, tarfile.GNUTYPE_SPARSE)
    return as_tar_gz(gzip.compress(members + _TAR_END))


def _padding_past_limit(s: Sources) -> Parts:
    head = good_tar_members(s) + tar_header("my-adapter/padding.txt", tarfile.REGTYPE, 64 * MIB)
    return as_tar_gz(gzip_with_zeros(head, 64 * MIB, _TAR_END))


# --- zip, around a good one's central directory


def good_zip_parts(s: Sources) -> tuple[bytes, bytes]:
    """A good zip's bytes before its central directory, and the directory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in good_files(s):
            bundle.writestr(name, data)
    raw = buffer.getvalue()
    _, _, _, _, _, size, offset, _ = _ZIP_END.unpack(raw[-_ZIP_END.size :])
    return raw[:offset], raw[offset : offset + size]


def zip_end(entries: int, size: int, offset: int, *, comment_size: int = 0) -> bytes:
    return _ZIP_END.pack(b"PK\x05\x06", 0, 0, entries, entries, size, offset, comment_size)


def as_zip(archive: bytes) -> Parts:
    return {"archive": ("adapter.zip", archive)}


def directory_padded_with(extra_entries: int) -> Callable[[Sources], Parts]:
    """The good zip (2 entries, as its end record says) with ``extra_entries`` more in its central directory."""

    def build(s: Sources) -> Parts:
        body, directory = good_zip_parts(s)
        directory += _ZIP_DIR_ENTRY * extra_entries
        return as_zip(body + directory + zip_end(2, len(directory), len(body)))

    return build


def _one_entry_too_many(s: Sources) -> Parts:
    body, directory = good_zip_parts(s)
    directory += directory[: 46 + sum(struct.unpack_from("<3H", directory, 28))]  # the first entry again
    return as_zip(body + directory + zip_end(2, len(directory), len(body)))


def _zip64_end(s: Sources) -> Parts:
    body, directory = good_zip_parts(s)
    zip64_at = len(body) + len(directory)
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, len(directory), len(body))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
    return as_zip(body + directory + zip64_end + locator + zip_end(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF))


def _directory_past_end(s: Sources) -> Parts:
    body, directory = good_zip_parts(s)
    return as_zip(body + directory + zip_end(2, len(directory), len(body) + 10_000_000))


def _comment_length_lies(s: Sources) -> Parts:
    body, directory = good_zip_parts(s)
    return as_zip(body + directory + zip_end(2, len(directory), len(body), comment_size=100))


CASES: list[BadUpload] = [
    BadUpload("tar-pax-header-bomb", header_bomb(tarfile.XHDTYPE, 64 * MIB), "header of 67108864 bytes (a PAX"),
    BadUpload("tar-gnu-longname-bomb", header_bomb(tarfile.GNUTYPE_LONGNAME, 32 * MIB), "header of 33554432 bytes"),
    BadUpload("tar-global-pax-bomb", header_bomb(tarfile.XGLTYPE, 48 * MIB), "header of 50331648 bytes"),
    BadUpload("tar-pax-size-hides-bomb", _pax_size_hides_bomb, "header of 41943040 bytes"),
    BadUpload("tar-header-record-flood", _header_record_flood, "more than 64 PAX or GNU long-name header records"),
    BadUpload("tar-negative-size", _negative_size, "the header at byte 0 declares a negative size"),
    BadUpload("tar-sparse-member", _sparse_member, "is stored as a GNU sparse file"),
    BadUpload(
        "tar-padding-past-limit",
        _padding_past_limit,
        "expands to more than 1000000 bytes",
        settings={"LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES": 1_000_000},
    ),
    BadUpload(
        "zip-end-record-hides-entries",
        directory_padded_with(100_000),
        "end record counts 2 entries but its central directory holds more than 32",
    ),
    BadUpload("zip-end-record-miscounts", _one_entry_too_many, "its central directory holds 3;"),
    BadUpload("zip64-end-record", _zip64_end, "has zip64 end records"),
    BadUpload("zip-directory-past-end", _directory_past_end, "runs past its end record"),
    BadUpload(
        "zip-directory-too-big",
        directory_padded_with(20_000),
        "past the 786604 bytes that 4 members can fill",
        settings={"LORAFLEET_ARCHIVE_MAX_MEMBERS": 4},
    ),
    BadUpload("zip-comment-length-lies", _comment_length_lies, "claims a 100-byte comment but 0 bytes follow it"),
]
