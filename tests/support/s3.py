"""A real S3-compatible server for the tests: moto_server as its own process on loopback."""

from __future__ import annotations

import os
import sys

import pytest

from relay.storage.s3 import S3Storage
from tests.support.processes import ManagedProcess, free_port, missing, wait_for_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "isdr-test",
    "AWS_SECRET_ACCESS_KEY": "isdr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "isdr-test"
PREFIX = "relay"


@pytest.fixture
def s3_server(tmp_path):
    """The endpoint URL of a fresh moto_server process."""
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
    """S3Storage on a new bucket of that server (credentials set in this process too)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    storage = S3Storage(bucket=BUCKET, prefix=PREFIX, endpoint_url=s3_server)
    storage.ensure_bucket()
    return storage


def relay_s3_env(endpoint: str) -> dict[str, str]:
    """The relay's settings for that bucket."""
    return {**CREDENTIALS, "STORAGE": "s3", "S3_ENDPOINT_URL": endpoint, "S3_BUCKET": BUCKET,
            "S3_PREFIX": PREFIX}
