"""The Kubernetes mode's metrics: what `isdr scp` and `isdr operator` serve while a series runs.

The same processes as the operator end-to-end tests (a real control plane, Job pods run by the
node agent, dcmtk, the emulator), each serving /metrics on a port of its own.
"""

from __future__ import annotations

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.kube.test_operator_end_to_end import (  # noqa: F401 - fixtures
    Relay,
    fingerprint_manifest,
    key_of,
    make_peers,
    peers,
)
from tests.support.processes import free_port, wait_for_port, wait_until
from tests.support.prometheus import scrape

pytestmark = pytest.mark.kube

PATIENT = ("Zebra^Quentin", "PID-4711-XYZ")


class MeteredRelay(Relay):
    """isdr scp and isdr operator, each with its own METRICS_PORT."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scp_metrics, self.operator_metrics = free_port(), free_port()
        self.env["METRICS_PORT"] = str(self.scp_metrics)

    def start_operator(self) -> None:
        receiver_env = self.env
        self.env = {**receiver_env, "METRICS_PORT": str(self.operator_metrics)}
        try:
            super().start_operator()
        finally:
            self.env = receiver_env


@pytest.fixture
def metered_relay(kube_cluster, node_agent, kube_namespace, tmp_path):
    if node_agent is None:
        pytest.skip("these tests run Job pods through the local node agent")
    kube_cluster.custom.create_namespaced_custom_object(
        "kopf.dev", "v1", kube_namespace, "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "isdr"}})
    relay = MeteredRelay(kube_cluster, node_agent, kube_namespace, tmp_path / "relay")
    relay.workdir.mkdir(parents=True, exist_ok=True)
    yield relay.start()
    relay.stop()


def test_receiver_and_operator_metrics_tell_a_series_story_and_kopf_stays_quiet(metered_relay, peers, tmp_path):
    emulator, pacs = peers
    r = metered_relay
    wait_for_port(r.scp_metrics, timeout=30)
    wait_for_port(r.operator_metrics, timeout=30)
    assert r.apply(fingerprint_manifest("ct-organs", emulator, pacs)).returncode == 0
    wait_until(lambda: (r.fingerprint("ct-organs").get("status") or {}).get("conditions"), 30, "the Fingerprint")
    files = write_ct_series(tmp_path / "ct", count=4, rows=16, cols=16, patient_name=PATIENT[0],
                            patient_id=PATIENT[1])
    key = key_of(files)

    r.send(files)
    r.wait_series_phase(key, "Succeeded")
    pacs.wait_for_files(1)

    receiver_text, receiver = scrape(r.scp_metrics)
    assert receiver[("isdr_instances_received_total", ())] == 4
    assert receiver[("isdr_received_bytes_total", ())] > sum(p.stat().st_size for p in files) * 0.9
    assert receiver[("isdr_associations_accepted_total", ())] == 1
    assert receiver[("isdr_storage_free_bytes", ())] > 0

    def operator_counts():
        return scrape(r.operator_metrics)[1]

    operator = wait_until(lambda: (s := operator_counts()).get(
        ("isdr_tasks_finished_total", (("fingerprint", "ct-organs"), ("outcome", "succeeded")))) == 1 and s,
        30, "the operator to count the finished task")
    assert operator[("isdr_tasks_started_total", (("fingerprint", "ct-organs"),))] == 1
    assert operator[("isdr_tasks_finished_total", (("fingerprint", "ct-organs"), ("outcome", "failed")))] == 0
    duration = operator[("isdr_task_duration_seconds_sum", (("fingerprint", "ct-organs"), ("outcome", "succeeded")))]
    assert 0 < duration < 120
    assert operator[("isdr_series", (("phase", "Succeeded"),))] == 1
    assert operator[("isdr_series", (("phase", "Receiving"),))] == 0
    assert operator[("isdr_tasks", (("phase", "Succeeded"),))] == 1
    assert operator[("isdr_storage_free_bytes", ())] > 0
    assert operator[("isdr_operator_active", ())] == 1

    assert r.health()[0] == 200  # a liveness probe: one kopf activity more
    operator_text = scrape(r.operator_metrics)[0]
    assert not any(text in receiver_text + operator_text for text in PATIENT)
    # kopf's "Handler '...' succeeded." after every watch event, "Activity '...' succeeded." after
    # every probe: not in the operator's log; the operator's own story is.
    log = r.operator_log()
    assert "succeeded." not in log, [line for line in log.splitlines() if "succeeded." in line][:5]
    assert "created Job" in log and "serving Prometheus metrics" in log
