"""Storage in a local (or shared, ReadWriteMany) directory.

Every put is written to a temporary file in the target folder, fsynced, renamed into place and
the folder fsynced: a crash leaves either the old object or the new one, never half of one, and
an acknowledged object survives power loss.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from relay.storage.base import Chunks, ObjectInfo, Storage, StorageError, StorageFull, check_key

_TMP_PREFIX = ".tmp-"


class LocalStorage(Storage):
    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        # Folders known to exist and to have been fsynced into their parent.
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def describe(self) -> str:
        return f"local directory {self.root}"

    def _path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # check_key already refuses '..'; this catches symlinked folders pointing outside.
        if not path.resolve().is_relative_to(self.root) and path.resolve() != self.root:
            raise StorageError(f"storage key {key!r} resolves outside {self.root}")
        return path

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        with self._dirs_lock:
            if folder in self._known_dirs:
                return
            if not folder.resolve().is_relative_to(self.root):
                # check_key refuses '..'; this catches a symlinked folder pointing outside.
                raise StorageError(f"storage folder {folder} resolves outside {self.root}")
            missing = []
            current = folder
            while not current.exists():
                missing.append(current)
                current = current.parent
            folder.mkdir(parents=True, exist_ok=True)
            # Make new folders durable in their parents, from the top down.
            for created in reversed(missing):
                _fsync_dir(created.parent)
            self._known_dirs.add(folder)

    def put(self, key: str, chunks: Chunks) -> None:
        # The folder is checked once (in _ensure_dir), not per file: the file itself is renamed
        # into place, which replaces a symlink there rather than following it.
        path = self.root / check_key(key)
        if self.min_free_bytes:
            free = self.free_bytes()
            if free is not None and free < self.min_free_bytes:
                raise StorageFull(f"only {free} bytes free in {self.root}")
        self._ensure_dir(path.parent)
        tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileNotFoundError:
                # The folder was removed since we made it (a cleanup of an empty series).
                self._known_dirs.discard(path.parent)
                self._ensure_dir(path.parent)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                os.fdatasync(fd)  # the data and what is needed to read it back; not the mtime
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left writing {key}: {exc}") from exc
            raise StorageError(f"could not write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageError(f"could not read {key}: {exc}") from exc

    def download(self, key: str, destination: Path) -> None:
        try:
            shutil.copyfile(self._path(key), destination)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageError(f"could not copy {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            check_key(prefix)
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return
        for folder, dirs, files in os.walk(start):
            dirs.sort()
            for name in sorted(files):
                if name.startswith(_TMP_PREFIX):
                    continue
                full = Path(folder) / name
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = full.stat()
                except FileNotFoundError:
                    continue  # deleted while we walked
                yield ObjectInfo(key=key, size=stat.st_size, modified=stat.st_mtime)

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                parents.add(path.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"could not delete {key}: {exc}") from exc
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            self._remove_empty_dirs(folder)

    def _remove_empty_dirs(self, folder: Path) -> None:
        # Empty series folders are removed so that a listing stays cheap; stop at the root.
        with self._dirs_lock:
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:
                    break
                self._known_dirs.discard(folder)
                folder = folder.parent

    def free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def clean_temporary_files(self) -> int:
        """Remove temporary files left by a crash in the middle of a put."""
        removed = 0
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    _unlink_quietly(Path(folder) / name)
                    removed += 1
        return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
