"""Reading uploaded archives without extracting them, and writing output archives.

Uploads are untrusted: nothing is ever extracted to disk. Members are opened in place and
handed to pydicom, so names with `..`, absolute paths and links cannot escape anything; links and
other non-regular members are simply ignored.

Output archives may deliberately be hostile (the evil-* models), so the writer can produce
symlinks, hardlinks, unsafe names and a decompression bomb, the last one streamed so that the
emulator never holds the expanded size in memory.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

MAX_MEMBERS = 200_000


class InputArchiveError(ValueError):
    """The uploaded archive cannot be read at all (not a zip/tar, truncated, too many members)."""


# --- reading uploads ------------------------------------------------------------------------


def iter_zip_members(path: Path) -> Iterator[tuple[str, BinaryIO]]:
    """(name, open member) for every regular file of a zip; links and folders are skipped."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputArchiveError(f"the upload is not a readable zip archive: {exc}") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise InputArchiveError(f"the zip holds more than {MAX_MEMBERS} entries")
        for info in infos:
            # Many writers leave the file-type bits of the Unix mode at zero: that is a file.
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if info.is_dir() or (file_type and file_type != stat.S_IFREG):
                continue
            try:
                member = archive.open(info)
            except (zipfile.BadZipFile, NotImplementedError, OSError):
                continue  # one unreadable member (encrypted, odd compression) is skipped
            with member:
                yield info.filename, member


def iter_tar_members(path: Path) -> Iterator[tuple[str, BinaryIO]]:
    """(name, open member) for every regular file of a tar (plain or compressed)."""
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputArchiveError(f"the upload is not a readable tar archive: {exc}") from exc
    count = 0
    with archive:
        try:
            for info in archive:
                count += 1
                if count > MAX_MEMBERS:
                    raise InputArchiveError(f"the tar holds more than {MAX_MEMBERS} entries")
                if not info.isreg():
                    continue
                member = archive.extractfile(info)
                if member is None:
                    continue
                with member:
                    yield info.name, member
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InputArchiveError(f"the tar archive is damaged: {exc}") from exc


def iter_members(path: Path, kind: str) -> Iterator[tuple[str, BinaryIO]]:
    if kind == "zip":
        return iter_zip_members(path)
    if kind == "tar":
        return iter_tar_members(path)
    raise ValueError(f"unknown archive kind {kind!r}")


# --- writing outputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One member of an output archive. kind: file | dir | symlink | hardlink | zeros."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""  # symlink / hardlink target
    size: int = 0  # zeros: how many


def file_entry(name: str, data: bytes) -> Entry:
    return Entry(name, "file", data=data)


class _Zeros:
    """A read()-able stream of `size` zero bytes, so a bomb is written without holding it."""

    _BLOCK = bytes(1 << 20)

    def __init__(self, size: int):
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._left
        n = min(n, self._left, len(self._BLOCK))
        self._left -= n
        return self._BLOCK[:n]


def _write_zip(handle: BinaryIO, entries: list[Entry]) -> None:
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=time.localtime()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr carries a Unix mode
            if entry.kind == "dir":
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                archive.writestr(info, b"")
            elif entry.kind == "file":
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, entry.data)
            elif entry.kind == "symlink":
                # Info-ZIP's convention: the link target is the member's content.
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                info.compress_type = zipfile.ZIP_STORED
                archive.writestr(info, entry.target.encode())
            elif entry.kind == "zeros":
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.file_size = entry.size  # lets zipfile choose zip64 up front if needed
                with archive.open(info, "w", force_zip64=entry.size >= zipfile.ZIP64_LIMIT) as out:
                    zeros = _Zeros(entry.size)
                    while block := zeros.read():
                        out.write(block)
            elif entry.kind == "hardlink":
                continue  # zip has no hardlinks; the evil-symlink model notes this
            else:
                raise ValueError(f"unknown entry kind {entry.kind!r}")


def _write_tar(handle: BinaryIO, entries: list[Entry], gzip: bool) -> None:
    now = time.time()
    # Stream mode ("w|"), so a bomb entry is compressed block by block.
    with tarfile.open(fileobj=handle, mode="w|gz" if gzip else "w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = now
            info.mode = 0o644
            if entry.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, _BytesReader(entry.data))
            elif entry.kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
                archive.addfile(info)
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
                archive.addfile(info)
            elif entry.kind == "zeros":
                info.size = entry.size
                archive.addfile(info, _Zeros(entry.size))
            else:
                raise ValueError(f"unknown entry kind {entry.kind!r}")


class _BytesReader:
    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_archive(path: Path, kind: str, entries: list[Entry], gzip: bool = False) -> None:
    """Write `entries` as a zip or a tar (optionally gzip-compressed) at `path`, atomically."""
    if kind == "zip":
        _atomic(path, lambda handle: _write_zip(handle, entries))
    elif kind == "tar":
        _atomic(path, lambda handle: _write_tar(handle, entries, gzip))
    else:
        raise ValueError(f"unknown archive kind {kind!r}")
