"""Fixtures with real peers: dcmtk programs, the InferenceServer emulator, `isdr run` processes."""

from __future__ import annotations

import pytest

from tests.support.dicom_peers import StoreSCP
from tests.support.emulator import EmulatorProcess
from tests.support.processes import require_dcmtk
from tests.support.relay_process import RelayProcess


@pytest.fixture
def dcmtk():
    for name in ("storescu", "storescp", "echoscu"):
        require_dcmtk(name)


@pytest.fixture
def emulator(tmp_path):
    server = EmulatorProcess(tmp_path / "emulator", tls=False, delay=0.5)
    yield server
    server.stop()


@pytest.fixture
def tls_emulator(tmp_path):
    server = EmulatorProcess(tmp_path / "emulator-tls", tls=True, delay=0.5)
    yield server
    server.stop()


@pytest.fixture
def pacs(tmp_path, dcmtk):
    destination = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    yield destination
    destination.stop()


@pytest.fixture
def relays(tmp_path):
    """Factory of `isdr run` processes; each is stopped at the end of the test."""
    started = []

    def make(env=None, name="relay", **kwargs) -> RelayProcess:
        relay = RelayProcess(tmp_path / name, env=env, **kwargs)
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()
