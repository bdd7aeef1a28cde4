"""The local storage's write-ahead journal: an upload is durable once its commit returns, through
a journal record until a checkpoint has fsynced it in place; a process that dies leaves a
journal that the next one replays (fsyncs in place on the same boot, writes back after a
restart of the machine); nothing that was not committed, or was checkpointed, is replayed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay.storage import journal as journal_module
from relay.storage.journal import FOLDER_NAME, Journal
from relay.storage.local import LocalStorage
from tests.support.processes import wait_until
from tests.support.small_disk import SmallDisk

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"series/1.2/1.3/1.{index}.dcm" for index in range(5)]


def content(index: int) -> bytes:
    return bytes([index]) * (1000 + 37 * index) + b"end"


def put_in_a_process_that_dies(root: Path, keys: list[str], checkpoint_first: bool = False,
                               cut_last_record: bool = False) -> None:
    """Puts `keys` through a journaled storage in a child process that exits without closing it."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from relay.storage.local import LocalStorage
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from unit.test_storage_journal import content
        storage = LocalStorage(Path({str(root)!r}), journal=True)
        storage.journal.interval = 3600
        keys = {keys!r}
        for index, key in enumerate(keys):
            storage.put(key, (content(index)[:500], content(index)[500:]))
            if {checkpoint_first!r} and index == len(keys) - 2:
                storage.journal.checkpoint()
        if {cut_last_record!r}:
            slot = storage.journal._active
            os.pwrite(slot.fd, b"\\xff" * 8, slot.end - 8)  # the last record, cut short
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)


def journal_files(root: Path) -> list[str]:
    return sorted(path.name for path in (root / FOLDER_NAME).iterdir())


def test_a_journaled_put_is_in_place_when_it_returns_and_a_close_leaves_no_journal(tmp_path):
    storage = LocalStorage(tmp_path, journal=True)
    for index, key in enumerate(KEYS):
        storage.put(key, (content(index),))
    assert [storage.get(key) for key in KEYS] == [content(index) for index in range(len(KEYS))]
    assert [info.key for info in storage.list("")] == KEYS, "the journal is not an object"
    assert sorted(path.name for path in tmp_path.iterdir()) == [FOLDER_NAME, "series"], \
        "the temporary files made ahead wait in the journal's folder"
    storage.close()
    assert journal_files(tmp_path) == []


@pytest.mark.parametrize("syncfs", [True, False], ids=["one syncfs", "fsync of each file"])
def test_a_checkpoint_makes_what_the_slot_covers_durable_and_recycles_it(tmp_path, monkeypatch, syncfs):
    synced = []
    monkeypatch.setattr(journal_module, "USE_SYNCFS", syncfs)
    monkeypatch.setattr(journal_module, "_fsync_path", lambda path: synced.append(path.name) or True)
    real_syncfs = journal_module._syncfs
    monkeypatch.setattr(journal_module, "_syncfs", lambda fd: synced.append("syncfs") or real_syncfs(fd))
    storage = LocalStorage(tmp_path, journal=True)
    storage.journal.interval = 3600
    storage.put(KEYS[0], (content(0),))
    storage.put(KEYS[1], (content(1),))
    epoch = storage.journal._active.epoch
    storage.journal.checkpoint()
    assert synced == (["syncfs"] if syncfs else ["1.0.dcm", "1.1.dcm"])
    assert storage.journal._slots[0].epoch != epoch, "the slot gets a new epoch: its records are void"
    storage.close()


def test_a_process_killed_on_the_same_boot_leaves_files_that_are_fsynced_in_place(tmp_path, monkeypatch):
    put_in_a_process_that_dies(tmp_path, KEYS)
    synced = []
    real = journal_module._fsync_path
    monkeypatch.setattr(journal_module, "_fsync_path", lambda path: synced.append(path.name) or real(path))
    storage = LocalStorage(tmp_path, journal=True)
    assert sorted(synced) == sorted(Path(key).name for key in KEYS)
    assert [storage.get(key) for key in KEYS] == [content(index) for index in range(len(KEYS))]
    storage.close()
    assert journal_files(tmp_path) == []


def test_after_a_machine_restart_every_committed_upload_is_written_back(tmp_path, monkeypatch):
    put_in_a_process_that_dies(tmp_path, KEYS)
    for key in KEYS[1:]:
        (tmp_path / key).unlink()  # what the page cache held and the crash lost
    (tmp_path / KEYS[0]).write_bytes(b"")  # a file renamed into place whose data never reached the disk
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    storage = LocalStorage(tmp_path, journal=True)
    assert [storage.get(key) for key in KEYS] == [content(index) for index in range(len(KEYS))]
    storage.close()


def test_a_record_cut_short_by_the_crash_is_not_replayed(tmp_path, monkeypatch):
    put_in_a_process_that_dies(tmp_path, KEYS, cut_last_record=True)
    for key in KEYS:
        (tmp_path / key).unlink()
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    storage = LocalStorage(tmp_path, journal=True)
    assert [key for key in KEYS if storage.exists(key)] == KEYS[:-1], "the cut record was never acknowledged"
    storage.close()


def test_records_a_checkpoint_covered_are_never_replayed(tmp_path, monkeypatch):
    put_in_a_process_that_dies(tmp_path, KEYS, checkpoint_first=True)
    for key in KEYS:
        (tmp_path / key).unlink()  # deleted after they were stored (a cleaned-up series)
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    storage = LocalStorage(tmp_path, journal=True)
    assert [key for key in KEYS if storage.exists(key)] == KEYS[-1:], \
        "only the upload after the checkpoint is in a live record"
    storage.close()


def test_the_journal_of_a_running_process_is_left_alone(tmp_path):
    running = LocalStorage(tmp_path, journal=True)
    running.journal.interval = 3600
    running.put(KEYS[0], (content(0),))
    before = journal_files(tmp_path)
    other = LocalStorage(tmp_path, journal=True)
    assert set(before) <= set(journal_files(tmp_path)), "a journal whose lock is held is not replayed"
    other.close()
    running.clean_temporary_files()
    assert set(before) <= set(journal_files(tmp_path)), "temporary-file cleanup spares live journals"
    for index, key in enumerate(KEYS):
        running.put(key, (content(index),))  # and the files it made ahead for uploads
    assert running.get(KEYS[-1]) == content(len(KEYS) - 1)
    running.close()


def test_an_upload_that_does_not_fit_in_the_slot_is_committed_the_classic_way(tmp_path):
    journal = Journal(tmp_path / "journal", slot_bytes=64 * 1024, interval=3600)
    assert journal.commit("a", bytes(30 * 1024), tmp_path / "a", lambda: None)
    assert not journal.commit("b", bytes(64 * 1024), tmp_path / "b", lambda: pytest.fail("never placed"))
    journal.close()


def test_a_slot_half_full_is_checkpointed_at_once_so_that_large_records_keep_the_journal(tmp_path, monkeypatch):
    """Records of 128 KiB (an MR image) fill half a slot in a fraction of the checkpoint
    interval; its checkpoint then runs at once, not at the interval's end, so that the uploads
    after it find room in a recycled slot instead of falling back to the classic path."""
    storage = LocalStorage(tmp_path, journal=True)
    journal = storage.journal
    journal.interval = 3600
    journal_fds = {slot.fd for slot in journal._slots}
    classic = []
    real = os.fdatasync

    def fdatasync(fd):
        if fd not in journal_fds:
            classic.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    data = bytes(range(256)) * 512
    for index in range(journal.slot_bytes // 2 // len(data) + 1):
        storage.put(f"series/1.2/1.3/1.{index}.dcm", (data,))
    wait_until(lambda: journal.checkpoints == 1, what="the checkpoint of the slot that is half full")
    assert classic == [], "every upload was journaled"
    monkeypatch.undo()
    storage.close()


def test_a_large_upload_is_committed_the_classic_way(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path, journal=True)
    upload = storage.open_upload()
    chunk = bytes(range(256)) * 512
    for _ in range(journal_module.UPLOAD_LIMIT // len(chunk) + 1):
        upload.write(chunk)
    classic = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: classic.append(fd) or real(fd))
    journal_fds = {slot.fd for slot in storage.journal._slots}
    upload.commit(KEYS[0])
    assert classic and not journal_fds & set(classic), "its own file was fdatasynced, not the journal"
    assert storage.get(KEYS[0]) == chunk * (journal_module.UPLOAD_LIMIT // len(chunk) + 1)
    storage.close()


def test_a_checkpoint_that_fails_keeps_the_records_for_the_next_one(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path, journal=True)
    storage.journal.interval = 3600
    storage.put(KEYS[0], (content(0),))
    slot = storage.journal._active
    epoch = slot.epoch

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal_module, "_syncfs", failing)
    with pytest.raises(OSError):
        storage.journal.checkpoint()
    assert slot.epoch == epoch and slot.committed == [tmp_path / KEYS[0]], "not recycled: still replayable"
    monkeypatch.undo()
    storage.close()


def test_where_the_journal_cannot_be_locked_uploads_are_committed_the_classic_way(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(journal_module.fcntl, "flock", no_locks)
    storage = LocalStorage(tmp_path, journal=True)
    assert storage.journal is None
    storage.put(KEYS[0], (content(0),))
    assert storage.get(KEYS[0]) == content(0)
    storage.close()
    assert journal_files(tmp_path) == [], "nothing left that a later start would try to replay"


def test_after_a_failed_checkpoint_both_slots_are_replayed_older_first(tmp_path, monkeypatch):
    """A checkpoint that failed leaves its slot's records live while the other slot takes new
    ones: after a machine restart the later version of a key is the one that stays, whichever
    of the two slot files holds it."""
    storage = LocalStorage(tmp_path, journal=True)
    journal = storage.journal
    journal.interval = 3600
    journal.checkpoint()  # writers go to slot 1, slot 0 gets a newer epoch
    storage.put(KEYS[0], (b"first version",))
    monkeypatch.setattr(journal_module, "_syncfs", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        journal.checkpoint()  # slot 1 stays live; writers go back to slot 0
    monkeypatch.undo()
    storage.put(KEYS[0], (b"second version",))
    assert journal._active is journal._slots[0]
    os.close(journal._lock_fd)  # the process dies: its lock goes with it, its journal stays
    (tmp_path / KEYS[0]).unlink()  # and the machine loses what was not written back
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    recovered = LocalStorage(tmp_path, journal=True)
    assert recovered.get(KEYS[0]) == b"second version"
    recovered.close()


def test_a_record_left_unfinished_before_acknowledged_ones_does_not_hide_them(tmp_path, monkeypatch):
    """Concurrent associations reserve their places in order but sync in any order: a record
    whose writer had not finished (or whose write failed) can lie before acknowledged ones."""
    put_in_a_process_that_dies(tmp_path, KEYS)
    slot = next(path for path in (tmp_path / FOLDER_NAME).iterdir() if path.suffix == ".0")
    with open(slot, "r+b") as journal:  # the second record never written: zeros, as the slot was made
        journal.seek(journal_module.HEADER_SIZE)
        first = journal_module._RECORD.unpack(journal.read(journal_module._RECORD.size))
        second = journal_module.HEADER_SIZE + journal_module._RECORD.size + first[2] + first[3]
        journal.seek(second)
        record = journal_module._RECORD.unpack(journal.read(journal_module._RECORD.size))
        journal.seek(second)
        journal.write(bytes(journal_module._RECORD.size + record[2] + record[3]))
    for key in KEYS:
        (tmp_path / key).unlink()
    monkeypatch.setattr(journal_module, "boot_id", lambda: "another-boot")
    storage = LocalStorage(tmp_path, journal=True)
    assert [key for key in KEYS if storage.exists(key)] == [KEYS[0], *KEYS[2:]]
    storage.close()


def test_a_journal_the_disk_has_no_room_for_leaves_nothing_behind_and_uploads_go_the_classic_way(tmp_path):
    with SmallDisk(tmp_path / "disk", size_mb=16) as disk:  # smaller than the journal's two slots
        storage = LocalStorage(disk.path, journal=True)
        assert storage.journal is None
        assert not list((disk.path / FOLDER_NAME).iterdir()), "no part of a journal takes the disk's space"
        storage.put(KEYS[0], (content(0),))
        assert storage.get(KEYS[0]) == content(0)
        storage.close()
