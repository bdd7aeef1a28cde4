"""The relay with STORAGE=s3 against a real S3-compatible server process (moto_server)."""

from __future__ import annotations

import os
import sys

import pytest

from relay.storage.s3 import S3Storage
from relay.synthetic import write_ct_series
from tests.integration.test_relay_end_to_end import manifest, send, wait_until
from tests.support.processes import ManagedProcess, free_port, missing, wait_for_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "isdr-test",
    "AWS_SECRET_ACCESS_KEY": "isdr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_server(tmp_path):
    try:
        import moto.server  # noqa: F401 - is the S3 server installed?
    except ImportError:
        missing("moto_server (pip install 'moto[server]')")
    port = free_port()
    server = ManagedProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            tmp_path / "moto.log", env={**os.environ, **CREDENTIALS})
    wait_for_port(port, process=server.popen)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    storage = S3Storage(bucket="isdr-test", prefix="relay", endpoint_url=s3_server)
    storage.ensure_bucket()
    return storage


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


def test_relay_end_to_end_with_s3_storage(tmp_path, bucket, s3_server, emulator, pacs, relays):
    relay = relays(env={**CREDENTIALS, "STORAGE": "s3", "S3_ENDPOINT_URL": s3_server,
                        "S3_BUCKET": "isdr-test", "S3_PREFIX": "relay"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=4, rows=32, cols=32)

    send(relay, series)
    # Instances land in the bucket, not on the relay's disk.
    wait_until(lambda: len(list(bucket.list("series/"))) == 4 or emulator.stats()["submits"])
    assert relay.stored_instances() == []

    pacs.wait_for_files(1)
    assert emulator.stats()["tasks"][0]["input_files"] == 4
    wait_until(lambda: not list(bucket.list("series/")), message="instances deleted from the bucket")


def test_relay_killed_with_s3_storage_resumes_from_the_bucket(tmp_path, bucket, s3_server, emulator,
                                                              pacs, relays):
    relay = relays(env={**CREDENTIALS, "STORAGE": "s3", "S3_ENDPOINT_URL": s3_server,
                        "S3_BUCKET": "isdr-test", "S3_PREFIX": "relay", "POST_AFTER": "3"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32))
    relay.kill()

    relay.start()
    pacs.wait_for_files(1)
    assert emulator.stats()["submits"] == 1
