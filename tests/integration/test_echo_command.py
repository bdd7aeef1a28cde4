"""`isdr echo HOST PORT AET` against real DICOM peers: dcmtk's storescp and the relay itself.

Each outcome has its own exit code, since a script (or `helm test`) acts differently on each.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.dicom_peers import StoreSCP
from tests.support.processes import free_port
from tests.support.relay_process import RelayProcess


def isdr_echo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", "echo", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def storescp(tmp_path):
    scp = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    yield scp
    scp.stop()


def test_a_peer_that_answers_the_echo_exits_0(storescp):
    result = isdr_echo("127.0.0.1", str(storescp.port), "PACS")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"PACS@127.0.0.1:{storescp.port}: C-ECHO Success in ")
    assert result.stderr == ""


def test_the_relay_answers_the_echo_for_its_own_ae_title_only(tmp_path):
    relay = RelayProcess(tmp_path / "relay", ae_title="ISDR").start()
    try:
        assert isdr_echo("127.0.0.1", str(relay.port), "ISDR").returncode == 0
        refused = isdr_echo("127.0.0.1", str(relay.port), "SOMEONE_ELSE")
    finally:
        relay.stop()
    assert refused.returncode == 1, refused.stderr
    assert "rejected the association" in refused.stderr and "Called AE title not recognised" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""


def test_nothing_listening_exits_3():
    result = isdr_echo("127.0.0.1", str(free_port()), "ISDR", "--timeout", "5")
    assert result.returncode == 3
    assert result.stderr.startswith("isdr echo: no connection to 127.0.0.1:")


@pytest.mark.parametrize("args,message", [
    (("host", "0", "ISDR"), "is not a TCP port"),
    (("host", "104", "SEVENTEEN_CHARS_X"), "is not an AE title"),
    (("host", "104", "A\\B"), "is not an AE title"),
    (("host", "104", " ISDR"), "is not an AE title"),
    (("host", "104", "ISDR", "--timeout", "-1"), "is not a timeout"),
    (("host", "104"), "required: AET"),
])
def test_bad_arguments_exit_2_and_say_what_is_wrong(args, message):
    result = isdr_echo(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
