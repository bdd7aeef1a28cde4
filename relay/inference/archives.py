"""Input archives for the InferenceServer, and safe extraction of the output archives it returns.

Output archives come from the network and must be treated as hostile: a broken or compromised
server (or anything between it and us) could send entries named '../../etc/cron.d/x' or
'/home/relay/.ssh/authorized_keys', symbolic or hard links that point outside the extraction
folder and are then written through, device files, or a small archive that expands to fill the
disk (a "zip bomb", with sizes in the headers that lie). Extraction therefore never uses
ZipFile.extractall / TarFile.extractall: it walks the entries itself, writes only regular files
to paths it has checked, and counts the bytes it actually writes.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from pydicom import dcmread

from relay.uids import is_valid_uid

from .base import InferenceError

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
# A folder name in a v2 input tar: a series key the caller built from UIDs, checked anyway.
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record


class ArchiveRejected(InferenceError):
    """The archive cannot be used as a whole (corrupt, too large, too many entries, not an archive)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Building the input archive
# --------------------------------------------------------------------------------------------


def unique_names(paths: list[Path], used: set[str] | None = None) -> list[tuple[Path, str]]:
    """(path, archive name) pairs using each file's own name, suffixed '-2', '-3' on a clash."""
    used = set() if used is None else used
    pairs = []
    for path in paths:
        name = Path(path).name
        if name in ("", ".", ".."):
            raise ValueError(f"not a file name: {path}")
        candidate, n = name, 1
        while candidate in used:
            n += 1
            stem, dot, suffix = name.rpartition(".")
            candidate = f"{stem}-{n}.{suffix}" if dot and stem else f"{name}-{n}"
        used.add(candidate)
        pairs.append((Path(path), candidate))
    return pairs


def build_input_archive(fmt: str, series: dict[str, list[Path]], dest: Path) -> Path:
    """Write the archive a submit uploads, streaming the files from disk.

    'zip' (v1): flat, every file at the archive root, whatever series it belongs to.
    'tar' (v2): one folder per series, named by the dict key.
    The archive appears at `dest` only once complete.
    """
    if fmt not in ("zip", "tar"):
        raise ValueError(f"unknown archive format {fmt!r} (expected zip or tar)")
    if not series or not any(series.values()):
        raise ValueError("no files to archive")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        if fmt == "zip":
            _write_zip(series, part)
        else:
            _write_tar(series, part)
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def _write_zip(series: dict[str, list[Path]], target: Path) -> None:
    used: set[str] = set()
    # Deflate at level 1: CT slices shrink to about half (mostly air) at little CPU cost, and the
    # upload is the slow part. allowZip64 for series beyond 4 GB or 65535 files.
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, allowZip64=True, compresslevel=1) as zf:
        for paths in series.values():
            for path, name in unique_names(paths, used):
                zf.write(path, arcname=name)


def _write_tar(series: dict[str, list[Path]], target: Path) -> None:
    now = time.time()
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for folder, paths in series.items():
            if _SAFE_FOLDER.fullmatch(folder) is None:
                raise ValueError(f"not a safe folder name for a series: {folder!r}")
            directory = tarfile.TarInfo(folder)
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, now
            tar.addfile(directory)
            for path, name in unique_names(paths):
                with open(path, "rb") as source:
                    info = os.fstat(source.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        raise ValueError(f"not a regular file: {path}")
                    # Built by hand rather than gettarinfo(): no local user names, ids or modes leak.
                    entry = tarfile.TarInfo(f"{folder}/{name}")
                    entry.size, entry.mode, entry.mtime = info.st_size, 0o644, info.st_mtime
                    tar.addfile(entry, source)


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    """Files written (in archive order), entries skipped as (name, reason), bytes written.

    Iterating it, or len(), goes over the files, so it can be used where a list of paths is expected.
    """

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes_written: int = 0

    def __iter__(self) -> Iterator[Path]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class UnsafeName(ValueError):
    pass


def safe_relative_parts(name: str) -> tuple[str, ...]:
    """The path components of an archive entry name, or UnsafeName saying why it cannot be used.

    Backslashes count as separators (archives made on Windows use them, and '..\\x' must not
    slip through); '.' and empty components are dropped; absolute paths, drive letters and '..'
    anywhere are refused rather than "repaired", since such an entry is not what it claims to be.
    """
    if "\x00" in name:
        raise UnsafeName("NUL character in name")
    text = name.replace("\\", "/")
    if text.startswith("/"):
        raise UnsafeName("absolute path")
    if re.match(r"[A-Za-z]:", text):
        raise UnsafeName("absolute path (drive letter)")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeName("'..' in path")
    if not parts:
        raise UnsafeName("empty name")
    return parts


class _WriteFailed(Exception):
    """Writing to our own disk failed (disk full, ...): not the archive's fault."""


class _Extraction:
    """Writes entries below `root`, counting bytes, and can undo everything it wrote."""

    def __init__(self, root: Path, max_total_bytes: int):
        self.root = root
        self.limit = max_total_bytes
        self.result = ExtractResult()
        self._created_dirs: list[Path] = []

    def skip(self, name: str, reason: str) -> None:
        # repr(): a name is arbitrary text from the network and must not forge log lines.
        log.warning("output archive: skipped %.200r: %s", name, reason)
        self.result.skipped.append((name, reason))

    def _target(self, name: str) -> Path | None:
        try:
            parts = safe_relative_parts(name)
        except UnsafeName as exc:
            self.skip(name, str(exc))
            return None
        target = self.root.joinpath(*parts)
        # Defence in depth: the checks above already keep the path below root.
        if not target.is_relative_to(self.root):
            self.skip(name, "outside the extraction folder")
            return None
        return target

    def _make_dirs(self, directory: Path) -> None:
        """Create `directory` and missing parents below root; existing ones must be real folders."""
        missing = []
        current = directory
        while current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
                self._created_dirs.append(path)
            except FileExistsError:
                # A symbolic link here would lead outside root; we never create one, but check.
                if path.is_symlink() or not path.is_dir():
                    raise NotADirectoryError(f"{path} exists and is not a folder") from None

    def add_dir(self, name: str) -> None:
        target = self._target(name)
        if target is None:
            return
        try:
            self._make_dirs(target)
        except OSError as exc:
            self.skip(name, f"cannot create folder: {exc.strerror or exc}")

    def add_file(self, name: str, source: BinaryIO) -> None:
        target = self._target(name)
        if target is None:
            return
        try:
            self._make_dirs(target.parent)
            # O_EXCL: never overwrite (a duplicate entry) nor write through anything that exists;
            # O_NOFOLLOW for good measure. Mode 0644 whatever the archive says (no setuid, no x).
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            self.skip(name, "duplicate entry")
            return
        except OSError as exc:
            self.skip(name, f"cannot create file: {exc.strerror or exc}")
            return
        self.result.files.append(target)
        with os.fdopen(fd, "wb") as out:
            while True:
                # Reading may fail on a corrupt entry; that propagates and rejects the archive.
                chunk = source.read(_CHUNK)
                if not chunk:
                    break
                self.result.bytes_written += len(chunk)
                # The real guard against bombs: bytes actually produced, not declared sizes.
                if self.result.bytes_written > self.limit:
                    raise ArchiveRejected(f"archive expands beyond the limit of {self.limit} bytes")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _WriteFailed(exc) from exc

    def undo(self) -> None:
        for path in self.result.files:
            path.unlink(missing_ok=True)
        for path in reversed(self._created_dirs):
            try:
                path.rmdir()
            except OSError:
                pass
        self.result = ExtractResult()


def detect_format(archive: Path) -> str:
    """'zip' or 'tar' (possibly compressed), by content: the name of a downloaded file means nothing."""
    with open(archive, "rb") as f:
        head = f.read(4)
    # Looking for zip's magic at the start (not zipfile.is_zipfile, which searches the end of the
    # file and can be fooled by a tar whose last member is a zip).
    if head in _ZIP_MAGIC:
        return "zip"
    if head and tarfile.is_tarfile(archive):
        return "tar"
    raise ArchiveRejected("neither a zip nor a tar archive" if head else "empty archive")


def _extract_zip(archive: Path, job: _Extraction, max_members: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        entries = zf.infolist()
        if len(entries) > max_members:
            raise ArchiveRejected(f"{len(entries)} entries, more than the limit of {max_members}")
        declared = sum(e.file_size for e in entries)
        if declared > job.limit:  # honest big archives are refused before writing anything
            raise ArchiveRejected(f"declares {declared} bytes, more than the limit of {job.limit}")
        for entry in entries:
            mode = entry.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if entry.flag_bits & 0x1:
                job.skip(entry.filename, "encrypted")
            elif stat.S_ISLNK(mode):
                job.skip(entry.filename, "symbolic link")
            elif entry.is_dir() or kind == stat.S_IFDIR:
                job.add_dir(entry.filename)
            elif kind not in (0, stat.S_IFREG):
                job.skip(entry.filename, "not a regular file")
            else:
                with zf.open(entry) as source:
                    job.add_file(entry.filename, source)


def _extract_tar(archive: Path, job: _Extraction, max_members: int) -> None:
    # Stream mode ('r|*'): entries are handled as they are read, transparently decompressed,
    # with no seeking; a hostile archive cannot make us index millions of headers first.
    with tarfile.open(archive, mode="r|*") as tar:
        for count, member in enumerate(tar, start=1):
            if count > max_members:
                raise ArchiveRejected(f"more than the limit of {max_members} entries")
            if member.issym() or member.islnk():
                job.skip(member.name, "link")
            elif member.ischr() or member.isblk() or member.isfifo():
                job.skip(member.name, "device file or fifo")
            elif member.isdir():
                job.add_dir(member.name)
            elif member.isreg():
                if job.result.bytes_written + member.size > job.limit:
                    raise ArchiveRejected(f"archive expands beyond the limit of {job.limit} bytes")
                source = tar.extractfile(member)
                job.add_file(member.name, source)
            else:
                job.skip(member.name, "unsupported entry type")


def safe_extract(archive: Path, dest_dir: Path, max_total_bytes: int, max_members: int = 10000) -> ExtractResult:
    """Extract a zip or tar (detected by content) below `dest_dir`, refusing anything unsafe.

    Regular files and folders are written; links, devices, fifos and entries whose names are
    absolute or contain '..' are skipped and listed in the result. An archive that is corrupt,
    has more than `max_members` entries, or writes more than `max_total_bytes` raises
    ArchiveRejected, and everything written so far is removed.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    fmt = detect_format(archive)
    existed = dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    job = _Extraction(dest_dir.resolve(), max_total_bytes)
    try:
        if fmt == "zip":
            _extract_zip(archive, job, max_members)
        else:
            _extract_tar(archive, job, max_members)
    except BaseException as exc:
        job.undo()
        if not existed:
            try:
                dest_dir.rmdir()
            except OSError:
                pass
        if isinstance(exc, ArchiveRejected):
            raise
        if isinstance(exc, _WriteFailed):
            raise exc.__cause__ from None
        if isinstance(exc, Exception):
            # Any parser error (bad CRC, truncated data, bad headers, decompression errors)
            # means the archive is unusable as a whole.
            raise ArchiveRejected(f"corrupt {fmt} archive: {type(exc).__name__}: {exc}") from exc
        raise
    return job.result


# --------------------------------------------------------------------------------------------
# Finding the DICOM files among the outputs
# --------------------------------------------------------------------------------------------


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM file: Part 10 ('DICM' after the 128-byte preamble), or a bare dataset.

    A bare dataset (no preamble) is accepted only if it starts with a group 0002/0008 element
    and pydicom reads a valid SOP Class and SOP Instance UID from it. Forcing pydicom to read any
    file would "succeed" on many logs and NIfTI volumes, and could then send garbage onwards.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):  # little-endian group 0002 or 0008 first
        return False
    try:
        ds = dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        return is_valid_uid(str(ds.get("SOPClassUID", ""))) and is_valid_uid(
            str(ds.get("SOPInstanceUID", ""))
        )
    except Exception:  # any parser error on foreign data just means "not DICOM"
        return False


def find_dicom_files(root: Path) -> list[Path]:
    """DICOM files anywhere below `root` (sorted); other files are skipped, logged at debug."""
    found = []
    for folder, dirs, files in os.walk(root):  # does not follow symbolic links to folders
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                log.debug("skipping %s: not a regular file", path)
            elif is_dicom_file(path):
                found.append(path)
            else:
                log.debug("skipping %s: not a DICOM file", path)
    return found
