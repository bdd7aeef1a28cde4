"""The Kubernetes mode's metrics: what `isdr scp` and `isdr operator` serve while a series runs.

The same processes as the operator end-to-end tests (a real control plane, Job pods run by the
node agent, dcmtk, the emulator), each serving /metrics on a port of its own.
"""

from __future__ import annotations

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.kube.relay_harness import Relay, fingerprint_manifest, key_of
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
def metered_relay(relay):
    return relay(MeteredRelay)


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


def test_the_operator_counts_the_errors_a_job_met_once_and_not_again_after_a_restart(relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay(MeteredRelay, DELIVERY_TIMEOUT=4)  # a destination that never answers fails the task soon
    wait_for_port(r.operator_metrics, timeout=30)
    fingerprint = fingerprint_manifest("ct-organs", emulator, pacs)
    fingerprint["spec"]["destinations"].append({"host": "127.0.0.1", "port": free_port(), "aeTitle": "NOBODY"})
    assert r.apply(fingerprint).returncode == 0
    wait_until(lambda: (r.fingerprint("ct-organs").get("status") or {}).get("conditions"), 30, "the Fingerprint")
    files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    key = key_of(files)

    r.send(files)
    series = r.wait_series_phase(key, "Failed", timeout=180)
    (task,) = series["status"]["tasks"]
    # The Job's pod met the dead destination at each attempt and said so in its task record; the
    # operator copied that onto the task's entry (`kubectl get dicomseries -o yaml` shows it) ...
    reported = task["errors"]
    assert reported["delivery_unavailable"] >= 1 and set(reported) == {"delivery_unavailable"}
    failed = ("isdr_tasks_finished_total", (("fingerprint", "ct-organs"), ("outcome", "failed")))
    operator = wait_until(lambda: (s := scrape(r.operator_metrics)[1]).get(failed) == 1 and s, 30,
                          "the operator to count the failed task")
    # ... and counted it, exactly as reported, though nothing ever scraped the pod.
    assert operator[("isdr_delivery_errors_total", (("reason", "unavailable"),))] == reported["delivery_unavailable"]
    assert not any(name == "isdr_inference_errors_total" and value for (name, _), value in operator.items())

    # A restarted operator reads every Job and series again: it counts none of it a second time.
    r.operator.stop(timeout=20)
    r.start_operator()
    wait_until(lambda: "operator ready" in (r.workdir / "operator-2.log").read_text(errors="replace"), 60,
               "the restarted operator to catch up")
    wait_for_port(r.operator_metrics, timeout=30)
    after = scrape(r.operator_metrics)[1]
    assert after.get(("isdr_delivery_errors_total", (("reason", "unavailable"),)), 0) == 0
    assert after.get(failed, 0) == 0
    assert (r.series(key) or {})["status"]["tasks"][0]["errors"] == reported
