"""A write-ahead journal for local storage: an upload is made durable by one fdatasync of a
reused journal file, instead of an fsync of its new file and one of its folder.

Why this is as durable as fsyncing each file and folder, and cheaper: an fsync of a new file
commits the file system's metadata journal (the file's blocks, size, directory entry), and the
folder fsync commits it again; on the disks measured for this relay those two cost 1-1.3 ms per
instance, more than receiving it. Overwriting blocks of a file that already has them needs no
metadata at all, so its fdatasync only flushes data: 0.1-0.4 ms. So each upload's bytes are
written twice: to its temporary file (renamed to its key, as before) and, as one record with its
key, to the journal; the journal is fdatasynced before the rename, and the sender is answered
after the rename. A checkpoint thread later makes the files and folders the journal covers
durable in place, with one syncfs(2) of the file system (one metadata commit for them all;
where syncfs is missing, an fsync of each file and folder), and only then lets the journal be
overwritten. At every moment an acknowledged instance is either durable in its place or in a
journal record that is fdatasynced and not yet overwritten.

After a crash, the journal of the process that died (its lock file no longer locked) is read
by the next process that opens the storage with a journal:
  * same boot (the process died, the kernel did not): every file renamed into place is intact
    in the page cache, so the files its records name are fsynced (and their folders), nothing
    is rewritten; a file that is missing was deleted after it was stored, or never renamed
    (then it was never acknowledged).
  * another boot (power loss, kernel crash): every committed record is written back to its key
    through a classic durable put. An instance deleted in the second or so between its commit
    and the checkpoint can come back; the relay already treats an instance that reappears as a
    duplicate of what was dispatched (like a deletion that the crash undid).

Records are written in two alternating slot files; each slot has a header with an epoch number
and the boot id, written and fdatasynced when the slot is recycled, so records left over from
an earlier use of the slot (a different epoch) are never replayed; a record's CRC covers its
key and bytes, so one cut short by the crash (never acknowledged) ends the replay. An upload
larger than UPLOAD_LIMIT (kept in memory until its commit), or that does not fit in what is left
of the slot, takes the classic path (fdatasync of its file, rename, folder fsync), so nothing
waits for a checkpoint.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from itertools import count
from pathlib import Path
from typing import Callable

log = logging.getLogger("relay.storage")

FOLDER_NAME = ".tmp-journal"  # under the storage root; listings and temporary-file cleanup skip it
# Each slot is filled with zeros when created, so that every later record overwrites blocks the
# file owns (no metadata to commit). A slot half full is checkpointed; an upload that would not
# fit in what is left takes the classic path.
SLOT_BYTES = 16 * 1024 * 1024
CHECKPOINT_INTERVAL = 0.5  # seconds from a slot's first commit to its checkpoint
# Uploads larger than this take the classic path: for them the fdatasync of their own file is
# mostly the disk writing their bytes, which the journal would only double (measured: no faster
# from ~160 KB on, and a third more CPU for a 513 KB CT image). Smaller ones are held in memory
# until their commit writes them in one piece.
UPLOAD_LIMIT = 256 * 1024
_ZEROS = bytes(1024 * 1024)
_HEADER = struct.Struct("<8sQ40s")  # magic, epoch, boot id
_HEADER_MAGIC = b"ISDRJNL1"
HEADER_SIZE = 4096
_RECORD = struct.Struct("<4sQHxxII")  # magic, epoch, key length, data length, crc32 of key and data
_RECORD_MAGIC = b"ISJ2"


def boot_id() -> str:
    """The kernel's id of this boot ("" if unknown: then every replay rewrites)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class _Slot:
    def __init__(self, path: Path, size: int):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for offset in range(0, size, len(_ZEROS)):
                os.pwrite(self.fd, _ZEROS[:size - offset], offset)
        except OSError:  # e.g. a disk too small for it: leave no part of it behind
            self.remove()
            raise
        self.epoch = 0
        self.end = HEADER_SIZE
        self.inflight = 0  # writers between their reservation and the end of their pwrite/fdatasync
        self.written = 0  # records whose pwrite finished (the group fdatasync's tickets)
        self.synced = 0
        self.sync_lock = threading.Lock()
        self.committed: list[Path] = []
        self.first_commit = 0.0

    def remove(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Journal:
    def __init__(self, folder: Path, slot_bytes: int = SLOT_BYTES, interval: float = CHECKPOINT_INTERVAL):
        self.folder = folder
        self.slot_bytes = slot_bytes
        self.interval = interval
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        self.files_folder = folder / f"{name}.files"  # the storage's temporary files made ahead
        lock_path = folder / f"{name}.lock"
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # released by the kernel when this process dies
        except OSError:
            os.close(self._lock_fd)
            lock_path.unlink()
            raise
        self._boot = boot_id()
        self._epochs = count(int(time.time() * 1000) << 8)
        self._slots: list[_Slot] = []
        try:
            for index in (0, 1):
                self._slots.append(_Slot(folder / f"{name}.{index}", slot_bytes))
                self._prepare(self._slots[-1])  # its fdatasync also makes the zeros durable
            self.files_folder.mkdir()
            fsync_dir(folder)
        except OSError:  # no journal (the caller falls back to fsyncs), and none of its space taken
            for slot in self._slots:
                slot.remove()
            _remove_files(self.files_folder)
            os.close(self._lock_fd)
            lock_path.unlink(missing_ok=True)
            raise
        # Open for the journal's life: syncfs reports write-back errors since its descriptor opened.
        self._folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        self._active = self._slots[0]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._checkpoint_forever, name="storage-journal", daemon=True)
        self._thread.start()

    # --- the writers' side ----------------------------------------------------------------

    def commit(self, key: str, data: bytes | bytearray, path: Path, place: Callable[[], None]) -> bool:
        """Journal the upload (its key and bytes), fdatasync the journal, then `place` the file
        (its rename to `path`). False, with nothing placed: the upload must take the classic path."""
        if len(data) > UPLOAD_LIMIT:
            return False
        name = key.encode()
        crc = zlib.crc32(data, zlib.crc32(name))
        size = _RECORD.size + len(name) + len(data)
        with self._lock:
            slot = self._active
            if self._stopping or slot.end + size > self.slot_bytes:
                return False
            offset, epoch = slot.end, slot.epoch
            slot.end += size
            if offset <= self.slot_bytes // 2 < slot.end:
                self._changed.notify_all()  # half full: its checkpoint is due now, not at the interval's end
            slot.inflight += 1
            if not slot.committed:
                slot.first_commit = time.monotonic()
                self._changed.notify_all()
            slot.committed.append(path)
        header = _RECORD.pack(_RECORD_MAGIC, epoch, len(name), len(data), crc)
        try:
            try:
                written = os.pwritev(slot.fd, [header, name, data], offset)
                if written != size:
                    raise OSError(f"short write to the journal ({written} of {size} bytes)")
                self._sync(slot)
            except OSError as exc:
                log.warning("storage journal %s: %s; this upload is made durable on its own", slot.path, exc)
                return False
            place()
            return True
        finally:
            with self._lock:
                slot.inflight -= 1
                if not slot.inflight and slot is not self._active:  # a checkpoint waits for it
                    self._changed.notify_all()

    def _sync(self, slot: _Slot) -> None:
        """fdatasync the slot, shared by concurrent committers: a ticket taken after one's own
        pwrite is covered by any fdatasync that starts after it was taken."""
        with self._lock:
            slot.written += 1
            ticket = slot.written
        with slot.sync_lock:
            if slot.synced >= ticket:
                return
            with self._lock:
                covered = slot.written
            os.fdatasync(slot.fd)
            slot.synced = covered

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint_forever(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._due(self._active):
                    wait = (self._active.first_commit + self.interval - time.monotonic()
                            if self._active.committed else None)
                    self._changed.wait(timeout=wait)
                if self._stopping:
                    return
            try:
                self.checkpoint()
            except OSError as exc:  # the files are not known durable: keep their records, retry
                log.error("storage journal checkpoint failed (retrying in 1 s): %s", exc)
                time.sleep(1.0)

    def _due(self, slot: _Slot) -> bool:
        return bool(slot.committed) and (time.monotonic() - slot.first_commit >= self.interval
                                         or slot.end > self.slot_bytes // 2)

    def checkpoint(self) -> None:
        """Switch writers to the other slot, make what the old one covers durable in place, and
        recycle it."""
        with self._lock:
            old = self._active
            self._active = self._slots[1] if old is self._slots[0] else self._slots[0]
            while old.inflight:
                self._changed.wait()
            committed, old.committed = old.committed, []
        try:
            if committed and not (USE_SYNCFS and _syncfs(self._folder_fd)):
                folders = set()
                for path in dict.fromkeys(committed):
                    if _fsync_path(path):
                        folders.add(path.parent)
                for folder in folders:
                    fsync_dir(folder)
        except OSError:
            with self._lock:
                old.committed[:0] = committed
            raise
        self._prepare(old)
        self.checkpoints += 1

    def _prepare(self, slot: _Slot) -> None:
        """Give the slot a new epoch (durably), so none of its older records is ever replayed."""
        slot.epoch = next(self._epochs)
        os.pwrite(slot.fd, _HEADER.pack(_HEADER_MAGIC, slot.epoch, self._boot.encode()), 0)
        os.fdatasync(slot.fd)
        slot.end = HEADER_SIZE
        slot.written = slot.synced = 0

    def close(self) -> None:
        """Checkpoint everything and remove the journal (a clean stop leaves nothing to replay)."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
        self.checkpoint()
        self.checkpoint()
        for slot in self._slots:
            os.close(slot.fd)
            slot.path.unlink(missing_ok=True)
        _remove_files(self.files_folder)
        (self.folder / f"{self._slots[0].path.stem}.lock").unlink(missing_ok=True)
        os.close(self._folder_fd)
        os.close(self._lock_fd)


# --- recovery ---------------------------------------------------------------------------------

def recover(folder: Path, rewrite: Callable[[str, tuple[bytes]], None], key_path: Callable[[str], Path]) -> int:
    """Replay the journals of processes that died (their lock is free); returns how many
    committed uploads were made durable. `rewrite(key, chunks)` is a classic durable put."""
    if not folder.is_dir():
        return 0
    recovered = 0
    current_boot = boot_id()
    for lock_path in sorted(folder.glob("*.lock")):
        fd = os.open(lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's journal
            slots = [path for path in (folder / f"{lock_path.stem}.{index}" for index in (0, 1)) if path.exists()]
            for slot_path in sorted(slots, key=_epoch_of):  # the older slot's records first
                recovered += _replay(slot_path, current_boot, rewrite, key_path)
                slot_path.unlink()
            _remove_files(folder / f"{lock_path.stem}.files")
            lock_path.unlink()
        finally:
            os.close(fd)
    fsync_dir(folder)
    return recovered


def _remove_files(files_folder: Path) -> None:
    """Remove the temporary files a journal's storage made ahead (never renamed: never stored)."""
    if files_folder.is_dir():
        for path in files_folder.iterdir():
            path.unlink(missing_ok=True)
        files_folder.rmdir()


def _epoch_of(slot_path: Path) -> int:
    with open(slot_path, "rb") as slot:
        head = slot.read(_HEADER.size)
    return _HEADER.unpack(head)[1] if len(head) == _HEADER.size else 0


def _replay(slot_path: Path, current_boot: str, rewrite, key_path) -> int:
    with open(slot_path, "rb") as slot:
        journal = slot.read()
    if len(journal) < _HEADER.size:
        return 0
    magic, epoch, boot = _HEADER.unpack_from(journal)
    if magic != _HEADER_MAGIC:
        return 0
    same_boot = bool(current_boot) and boot.rstrip(b"\x00").decode(errors="replace") == current_boot
    replayed = 0
    folders = set()
    for key, data in _records(journal, epoch):
        if same_boot:
            path = key_path(key)
            if _fsync_path(path):
                folders.add(path.parent)
                replayed += 1
        else:
            rewrite(key, (data,))
            replayed += 1
    for folder in folders:
        fsync_dir(folder)
    if replayed:
        log.warning("storage journal %s of a process that stopped without checkpointing: %d instance(s) %s",
                    slot_path.name, replayed, "fsynced in place" if same_boot else "written back after a restart "
                    "of the machine")
    return replayed


def _records(journal: bytes, epoch: int):
    """The slot's whole records of `epoch`, in order, as (key, data).

    Writers reserve their records' places in order but write and fdatasync them concurrently, so
    a record cut short by the crash (or whose write failed, its upload then taking the classic
    path) can lie before records that were synced and acknowledged. So a place that holds no
    whole record is skipped to the next record start of this epoch (its magic and epoch; its CRC
    over key and bytes decides), never taken as the end."""
    start = _RECORD_MAGIC + struct.pack("<Q", epoch)
    offset = HEADER_SIZE
    while offset + _RECORD.size <= len(journal):
        magic, record_epoch, key_length, length, crc = _RECORD.unpack_from(journal, offset)
        body = offset + _RECORD.size
        end = body + key_length + length
        if magic == _RECORD_MAGIC and record_epoch == epoch and end <= len(journal):
            name, data = journal[body:body + key_length], journal[body + key_length:end]
            if zlib.crc32(data, zlib.crc32(name)) == crc:
                yield name.decode(), data
                offset = end
                continue
        offset = journal.find(start, offset + 1)  # not a whole record: never acknowledged
        if offset < 0:
            return


USE_SYNCFS = True
_LIBC = None


def _syncfs(fd: int) -> bool:
    """syncfs(2) of the file system holding the open folder `fd`: every file and folder on it
    made durable with one metadata commit, and a failure to write back any of them since `fd`
    was opened reported (False: not available here, fsync each file)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.syncfs.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    if _LIBC.syncfs(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"syncfs: {os.strerror(error)}")
    return True


def _fsync_path(path: Path) -> bool:
    """fsync a file by its name; False if it is not there (deleted since)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
