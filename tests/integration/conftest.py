"""Fixtures with real peers: dcmtk programs, the InferenceServer emulator, `isdr run` processes."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tests.support.dicom_peers import StoreSCP
from tests.support.emulator import EmulatorProcess
from tests.support.orthanc import Orthanc
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



@contextmanager
def _stopped_at_the_end(build):
    """A factory of started peers (`build(**kwargs)` makes one) that stops them all afterwards."""
    started = []

    def make(*args, **kwargs):
        peer = build(*args, **kwargs).start()
        started.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in started:
            peer.stop()


@pytest.fixture
def storescps(tmp_path, dcmtk):
    """Factory of dcmtk storescp destinations: storescps("PICKY", options=["+xi"], tls=...)."""
    with _stopped_at_the_end(lambda name="PACS", **kwargs: StoreSCP(tmp_path / name.lower(), ae_title=name,
                                                                      **kwargs)) as make:
        yield make


@pytest.fixture
def orthancs(tmp_path):
    """Factory of Orthanc servers (tests/support/orthanc.py): orthancs("STRICT", accepted_transfer_syntaxes=[...])."""
    with _stopped_at_the_end(lambda name="ORTHANC", **kwargs: Orthanc(tmp_path / name.lower(), ae_title=name,
                                                                        **kwargs)) as make:
        yield make
