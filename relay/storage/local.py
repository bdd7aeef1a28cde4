"""Storage in a local (or shared, ReadWriteMany) directory.

Every object is written to a temporary file under the root and renamed into place once it is
durable: a crash leaves either the old object or the new one, never half of one, and an
acknowledged object survives power loss. It is made durable in one of two ways:

  * classic: fdatasync of the file, rename, fsync of its folder. Concurrent writers into one
    folder share the folder's fsync (group commit): a writer waits for a folder fsync that
    started after its rename, one fsync for several instances of one series at once.
  * journaled (STORAGE_JOURNAL, the receiver's default): the bytes also go to a write-ahead
    journal, whose one fdatasync (of blocks it already owns) replaces both fsyncs; a checkpoint
    thread fsyncs files and folders in batches later (relay.storage.journal says why this is
    durable). An upload that the journal cannot take falls back to the classic way.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from relay.storage import journal as journal_module
from relay.storage.base import Chunks, ObjectInfo, Storage, StorageError, StorageFull, Upload, check_key
from relay.storage.journal import Journal, fsync_dir as _fsync_dir

log = logging.getLogger("relay.storage")
_TMP_PREFIX = ".tmp-"
# An upload still being written checks the free space again every this many bytes, so that one
# endless instance cannot eat the MIN_FREE_BYTES reserve.
_FREE_SPACE_CHECK_EVERY = 64 * 1024 * 1024


class LocalStorage(Storage):
    def __init__(self, root: Path, min_free_bytes: int = 0, journal: bool = False):
        """`journal`: make uploads durable through a write-ahead journal (see the module's text);
        the journals of processes that died are replayed here, before anything reads."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        # Folders known to exist and to have been fsynced into their parent.
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._folder_syncs = _GroupCommit()
        self.journal: Journal | None = None
        self._ready_files: _ReadyFiles | None = None
        if journal:
            folder = self.root / journal_module.FOLDER_NAME
            try:
                journal_module.recover(folder, self.put, self._path)
            except OSError as exc:  # what the dead journal holds must be durable before anything else
                raise _storage_error(exc, f"could not replay the storage journal in {folder}") from exc
            try:
                self.journal = Journal(folder)
            except OSError as exc:  # e.g. a network file system without locks: the classic way is as safe
                log.warning("no storage journal in %s (%s): each instance is fsynced with its folder instead",
                            folder, exc)
            if self.journal is not None:
                self._ready_files = _ReadyFiles(self.journal.files_folder)

    def close(self) -> None:
        """Checkpoint and remove the journal, if any (what a clean stop leaves needs no replay)."""
        journal, self.journal = self.journal, None
        ready_files, self._ready_files = self._ready_files, None
        if ready_files is not None:
            ready_files.close()
        if journal is not None:
            try:
                journal.close()
            except OSError as exc:
                log.error("closing the storage journal failed (it is replayed at the next start): %s", exc)

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

    def open_upload(self) -> "LocalUpload":
        self.check_free_space()
        ready_files = self._ready_files
        return LocalUpload(self, ready_files.take() if ready_files is not None else None)

    def check_free_space(self) -> None:
        if self.min_free_bytes:
            free = self.free_bytes()
            if free is not None and free < self.min_free_bytes:
                raise StorageFull(f"only {free} bytes free in {self.root}")

    def put(self, key: str, chunks: Chunks) -> None:
        self._write(self.open_upload(), key, chunks)

    def put_state(self, key: str, data: bytes) -> None:
        # No free-space check: the reserve is kept so that these still fit (see Storage.put_state).
        self._write(LocalUpload(self), key, (data,))

    @staticmethod
    def _write(upload: "LocalUpload", key: str, chunks: Chunks) -> None:
        try:
            for chunk in chunks:
                upload.write(chunk)
            upload.commit(key)
        finally:
            upload.discard()

    def _target(self, key: str) -> Path:
        """Where `key` is stored, its folder made (durably) if it was not there.

        The folder is checked once (in _ensure_dir), not per file: the file itself is renamed
        into place, which replaces a symlink there rather than following it."""
        path = self.root / check_key(key)
        self._ensure_dir(path.parent)
        return path

    def _rename(self, tmp: Path, path: Path) -> None:
        try:
            os.replace(tmp, path)
        except FileNotFoundError:
            # The folder was removed since we made it (a cleanup of an empty series).
            self._known_dirs.discard(path.parent)
            self._ensure_dir(path.parent)
            os.replace(tmp, path)

    def _place(self, tmp: Path, key: str) -> None:
        """Rename a complete, fsynced temporary file to `key` and make the folder entry durable."""
        path = self._target(key)
        self._rename(tmp, path)
        self._folder_syncs.sync_after_rename(path.parent)

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
            dirs[:] = sorted(name for name in dirs if not name.startswith(_TMP_PREFIX))
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
        for folder, dirs, files in os.walk(self.root):
            # Live journals and their files made ahead (a dead journal's are removed when it is replayed).
            dirs[:] = [name for name in dirs if name != journal_module.FOLDER_NAME]
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    _unlink_quietly(Path(folder) / name)
                    removed += 1
        return removed


class LocalUpload(Upload):
    """A temporary file in the storage root, renamed to its key once complete (same file system,
    so the rename is atomic); `clean_temporary_files` removes what a crash left behind. With a
    journal, the bytes of an upload up to journal.UPLOAD_LIMIT are kept in memory and written at
    the commit, to the file in one piece and to the journal as one record."""

    def __init__(self, storage: LocalStorage, created: tuple[Path, int] | None = None):
        """`created`: a temporary file made ahead (its path and descriptor), else one is made."""
        self._storage = storage
        self._unchecked = 0  # bytes written since free space was last checked
        self._journal = storage.journal
        # What the journal will take at the commit; None: the upload is committed the classic way.
        self._held: bytearray | None = bytearray() if self._journal is not None else None
        self._tmp: Path | None
        self._tmp, self._fd = created or _create_temporary(storage.root)

    def write(self, data) -> None:
        view = memoryview(data)
        self._unchecked += len(view)
        if self._unchecked >= _FREE_SPACE_CHECK_EVERY:
            self._unchecked = 0
            try:
                self._storage.check_free_space()
            except StorageFull:
                self.discard()
                raise
        if self._held is not None:
            if len(self._held) + len(view) <= journal_module.UPLOAD_LIMIT:
                self._held += view
                return
            held, self._held = self._held, None  # too large for the journal: to the file from now on
            self._write(held)
        self._write(view)

    def _write(self, data) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.discard()
            raise _storage_error(exc, "could not write") from exc

    def commit(self, key: str) -> None:
        if self._tmp is None:
            raise StorageError(f"upload for {key} was discarded")
        held, self._held = self._held, None
        if held is not None:
            self._write(held)
        try:
            if held is not None and self._journal is not None:
                tmp, path = self._tmp, self._storage._target(key)
                if self._journal.commit(key, held, path, lambda: self._storage._rename(tmp, path)):
                    self._tmp = None
                    os.close(self._fd)
                    self._fd = -1
                    return
            os.fdatasync(self._fd)  # the data and what is needed to read it back; not the mtime
            os.close(self._fd)
            self._fd = -1
            self._storage._place(self._tmp, key)
            self._tmp = None
        except OSError as exc:
            self.discard()
            raise _storage_error(exc, f"could not write {key}") from exc

    def discard(self) -> None:
        self._held = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            _unlink_quietly(self._tmp)
            self._tmp = None


def _create_temporary(folder: Path) -> tuple[Path, int]:
    path = folder / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except OSError as exc:
        raise _storage_error(exc, "could not create a temporary file") from exc


class _ReadyFiles:
    """Temporary files created ahead by a thread of their own, so that creating a file (as long
    as receiving a small instance) overlaps the association's own work; `take` never waits. They
    live in the journal's folder for them (same file system as the storage, so they are renamed
    into place), which temporary-file cleanup leaves alone and the journal's replay removes."""

    KEEP = 8  # refilled once half are taken: one wake-up of the thread for several files

    def __init__(self, root: Path):
        self._root = root
        self._ready: list[tuple[Path, int]] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._fill_forever, name="storage-files", daemon=True)
        self._thread.start()

    def take(self) -> tuple[Path, int] | None:
        with self._changed:
            if not self._ready:
                return None
            created = self._ready.pop()
            if len(self._ready) == self.KEEP // 2:
                self._changed.notify()
            return created

    def _fill_forever(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and len(self._ready) >= self.KEEP:
                    self._changed.wait()
                if self._stopping:
                    return
            try:
                created = _create_temporary(self._root)
            except StorageError as exc:  # a full disk, ...: the uploads create their own and say why
                log.debug("creating a temporary file ahead failed: %s", exc)
                with self._changed:
                    self._changed.wait(timeout=1.0)
                continue
            with self._changed:
                self._ready.append(created)

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        for path, fd in self._ready:
            os.close(fd)
            _unlink_quietly(path)
        self._ready.clear()


class _GroupCommit:
    """Folder fsyncs shared by concurrent writers.

    A writer takes a ticket after its rename, then holds the folder's lock: if an fsync that
    started after its ticket was issued has finished meanwhile, its entry is already durable;
    otherwise it fsyncs, covering every ticket issued so far."""

    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[Path, list] = {}  # folder -> [lock, last ticket issued, last ticket synced]

    def sync_after_rename(self, folder: Path) -> None:
        with self._lock:
            state = self._folders.get(folder)
            if state is None:
                if len(self._folders) > 4096:
                    self._folders.clear()  # forget idle folders; a new entry is simply re-created
                state = self._folders[folder] = [threading.Lock(), 0, 0]
            state[1] += 1
            ticket = state[1]
        with state[0]:
            if state[2] >= ticket:
                return
            with self._lock:
                covered = state[1]
            _fsync_dir(folder)
            state[2] = covered


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left: {what}: {exc}")
    return StorageError(f"{what}: {exc}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
