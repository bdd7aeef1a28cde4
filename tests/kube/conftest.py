"""Fixtures for the tests that need a real Kubernetes API (see tests/support/kube.py and
docs/development-kubernetes.md), and the relay's own (`relay`, `peers`, `make_peers`: the
relay as tests/kube/relay_harness.py runs it, an emulator and a PACS). Every test module here is
marked `kube`."""

import pytest

from tests.kube.relay_harness import Relay
from tests.support.dicom_peers import StoreSCP
from tests.support.emulator import EmulatorProcess
from tests.support.kube import kube_cluster, kube_namespace, node_agent, report_kept_dirs  # noqa: F401, F811 - fixtures
from tests.support.processes import require_dcmtk


def pytest_terminal_summary(terminalreporter):
    report_kept_dirs(terminalreporter)


@pytest.fixture
def make_peers(tmp_path):
    """(emulator, PACS) with the emulator's models taking `delay` seconds."""
    require_dcmtk("storescp")
    started = []

    def make(delay: float = 1.0):
        emulator = EmulatorProcess(tmp_path / f"emulator-{len(started)}", tls=False, delay=delay)
        pacs = StoreSCP(tmp_path / f"pacs-{len(started)}").start()
        started.append((emulator, pacs))
        return emulator, pacs

    yield make
    for emulator, pacs in started:
        pacs.stop()
        emulator.stop()


@pytest.fixture
def peers(make_peers):
    return make_peers(1.0)


@pytest.fixture
def relay(kube_cluster, node_agent, kube_namespace, tmp_path):
    if node_agent is None:
        pytest.skip("these tests run Job pods through the local node agent")
    kube_cluster.custom.create_namespaced_custom_object(
        "kopf.dev", "v1", kube_namespace, "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "isdr"}})
    made = []

    def make(kind=None, **env) -> Relay:
        """A started Relay (or `kind`, a subclass of it) with `env` on top of the test environment."""
        r = (kind or Relay)(kube_cluster, node_agent, kube_namespace, tmp_path / f"relay{len(made)}", env)
        r.workdir.mkdir(parents=True, exist_ok=True)
        made.append(r)
        return r.start()

    yield make
    for r in made:
        r.stop()
