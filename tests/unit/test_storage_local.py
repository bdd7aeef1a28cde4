"""The local storage backend: atomic, durable puts under keys that cannot escape the root."""

import errno
import os

import pytest

from relay.storage.base import StorageError, StorageFull
from relay.storage.local import LocalStorage


def test_put_get_list_delete_round_trip(tmp_path):
    storage = LocalStorage(tmp_path / "root")
    storage.put("series/1.2/1.3/1.4.dcm", (b"head", memoryview(b"body")))
    assert storage.get("series/1.2/1.3/1.4.dcm") == b"headbody"
    assert [(i.key, i.size) for i in storage.list("series/")] == [("series/1.2/1.3/1.4.dcm", 8)]
    assert storage.delete_prefix("series/1.2/") == 1
    assert list(storage.list("series/")) == []
    assert not (tmp_path / "root" / "series").exists(), "empty series folders are removed"


def test_a_put_replaces_an_object_whole(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("state/a.json", b"old")
    storage.put_bytes("state/a.json", b"new!")
    assert storage.get("state/a.json") == b"new!"
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["a.json"]


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "a//b", "a/./b", "", "a\\b", "a\x00b"])
def test_unsafe_keys_are_refused(tmp_path, key):
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError):
        storage.put_bytes(key, b"x")
    assert not (tmp_path / "x").exists()


def test_a_symlinked_folder_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "series").symlink_to(outside)
    with pytest.raises(StorageError):
        LocalStorage(root).put_bytes("series/x.dcm", b"x")
    assert list(outside.iterdir()) == []


def test_missing_key_is_a_key_error(tmp_path):
    with pytest.raises(KeyError):
        LocalStorage(tmp_path).get("nothing/here")


def test_below_the_free_space_reserve_the_put_is_refused_as_full(tmp_path):
    storage = LocalStorage(tmp_path, min_free_bytes=2**62)
    with pytest.raises(StorageFull):
        storage.put_bytes("a", b"x")


def test_disk_full_while_writing_is_storage_full_and_leaves_no_partial_file(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageFull):
        storage.put_bytes("series/1/2/3.dcm", b"x" * 10)
    monkeypatch.undo()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_temporary_files_of_a_crash_are_invisible_and_cleaned(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_bytes("series/1/2/3.dcm", b"x")
    (tmp_path / "series/1/2/.tmp-deadbeef").write_bytes(b"half")
    assert [i.key for i in storage.list("series/")] == ["series/1/2/3.dcm"]
    assert storage.clean_temporary_files() == 1


def test_an_upload_that_eats_into_the_free_space_reserve_is_stopped_and_removed(tmp_path, monkeypatch):
    from relay.storage import local

    storage = local.LocalStorage(tmp_path, min_free_bytes=1000)
    free = iter([10_000, 500])  # enough when it starts, below the reserve halfway
    monkeypatch.setattr(storage, "free_bytes", lambda: next(free))
    monkeypatch.setattr(local, "_FREE_SPACE_CHECK_EVERY", 4)
    upload = storage.open_upload()
    with pytest.raises(local.StorageFull):
        upload.write(b"12345")
    assert [p for p in tmp_path.iterdir()] == []


def test_concurrent_uploads_into_one_folder_all_land(tmp_path):
    import threading

    from relay.storage.local import LocalStorage

    storage = LocalStorage(tmp_path)

    def put(index):
        upload = storage.open_upload()
        upload.write(b"x" * index)
        upload.commit(f"series/1.2/1.3/{index}.dcm")

    threads = [threading.Thread(target=put, args=(index,)) for index in range(1, 17)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(storage.get(f"series/1.2/1.3/{i}.dcm") for i in range(1, 17)) == sorted(b"x" * i for i in range(1, 17))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
