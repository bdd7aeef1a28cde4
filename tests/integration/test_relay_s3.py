"""The relay with STORAGE=s3 against a real S3-compatible server process (moto_server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.integration.test_relay_end_to_end import send
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until
from tests.support.s3 import relay_s3_env

def test_s3_storage_round_trip(bucket, tmp_path):
    bucket.put("series/1.2/1.3/1.4.dcm", (b"abc", memoryview(b"def")))
    assert bucket.get("series/1.2/1.3/1.4.dcm") == b"abcdef"
    assert [i.key for i in bucket.list("series/")] == ["series/1.2/1.3/1.4.dcm"]
    bucket.download("series/1.2/1.3/1.4.dcm", tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == b"abcdef"
    assert bucket.delete_prefix("series/") == 1
    assert not bucket.exists("series/1.2/1.3/1.4.dcm")
    with pytest.raises(KeyError):
        bucket.get("series/1.2/1.3/1.4.dcm")


def test_a_streamed_upload_larger_than_memory_spools_under_the_storage_root_and_lands_whole(bucket, tmp_path):
    bucket.spool_dir = tmp_path / "spool"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    upload = bucket.open_upload()
    for _ in range(12):  # past the 8 MiB kept in memory: spooled to a file, sent in parts
        upload.write(chunk)
    # Spooled to an unnamed file (O_TMPFILE) in the spool folder, not in a shared /tmp.
    spooled = Path(os.readlink(f"/proc/self/fd/{upload._file.fileno()}"))
    assert spooled.parent == bucket.spool_dir
    assert not bucket.exists("series/1.2/1.3/1.5.dcm")  # nothing under the key before commit
    upload.commit("series/1.2/1.3/1.5.dcm")
    assert bucket.get("series/1.2/1.3/1.5.dcm") == chunk * 12
    assert list(bucket.spool_dir.iterdir()) == []


def test_a_discarded_upload_leaves_nothing(bucket, tmp_path):
    bucket.spool_dir = tmp_path / "spool"
    upload = bucket.open_upload()
    upload.write(b"partial")
    upload.discard()
    assert list(bucket.list("")) == []


def test_relay_end_to_end_with_s3_storage(tmp_path, bucket, s3_server, emulator, pacs, relays):
    relay = relays(env=relay_s3_env(s3_server))
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=4, rows=32, cols=32)

    send(relay, series)
    # Instances land in the bucket, not on the relay's disk.
    wait_until(lambda: len(list(bucket.list("series/"))) == 4 or emulator.stats()["submits"])
    assert relay.stored_instances() == []

    pacs.wait_for_files(1)
    assert emulator.stats()["tasks"][0]["input_files"] == 4
    wait_until(lambda: not list(bucket.list("series/")), what="instances deleted from the bucket")


def test_relay_killed_with_s3_storage_resumes_from_the_bucket(tmp_path, bucket, s3_server, emulator,
                                                              pacs, relays):
    relay = relays(env={**relay_s3_env(s3_server), "POST_AFTER": "3"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32))
    relay.kill()

    relay.start()
    pacs.wait_for_files(1)
    assert emulator.stats()["submits"] == 1
