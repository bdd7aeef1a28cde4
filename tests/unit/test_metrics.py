"""relay.metrics: names, labels from closed sets only, the seams' wrappers and the endpoint."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import pytest
import requests

from relay import metrics
from relay.config import ConfigError, load_settings
from relay.inference.base import PollResult, ServerUnavailable, SubmitRejected
from relay.storage.local import LocalStorage
from tests.support.processes import free_port

# The only label names an isdr_* metric may have: each has a closed set of values (or, for
# fingerprint, names an administrator chose, checked to be DNS-1123 labels).
ALLOWED_LABELS = {"status", "reason", "phase", "fingerprint", "outcome", "operation", "version"}
PATIENT_TEXT = "Zebra^Quentin PID-4711-XYZ 19700101"


def value(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def all_isdr_samples(registry=metrics.REGISTRY):
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("isdr_"):
                yield family, sample


def test_every_metric_of_the_relay_is_named_isdr_and_the_rest_are_the_standard_process_metrics():
    names = {family.name for family in metrics.REGISTRY.collect()}
    assert {name for name in names if not name.startswith("isdr_")} <= {
        "process_cpu_seconds", "process_virtual_memory_bytes", "process_resident_memory_bytes",
        "process_start_time_seconds", "process_open_fds", "process_max_fds"}
    assert {"isdr_instances_received", "isdr_received_bytes", "isdr_instances_refused",
            "isdr_associations_accepted", "isdr_associations_rejected", "isdr_tasks_started",
            "isdr_tasks_finished", "isdr_task_duration_seconds", "isdr_inference_errors",
            "isdr_delivery_errors", "isdr_possible_duplicate_submits", "isdr_build"} <= names


def test_labels_come_from_closed_sets_whatever_the_callers_pass():
    metrics.instance_refused(0xA700)
    metrics.instance_refused(-5)
    metrics.instance_refused(0x1_0000)
    metrics.association_rejected(PATIENT_TEXT)
    metrics.inference_error(PATIENT_TEXT)
    metrics.delivery_error(PATIENT_TEXT)
    metrics.task_started("t-free-text", PATIENT_TEXT)
    metrics.task_finished("t-free-text", PATIENT_TEXT, "Failed")
    metrics.task_finished("t-free-text", "ct-thorax", PATIENT_TEXT)  # not a terminal phase: not counted

    assert value("isdr_instances_refused_total", status="A700") >= 1
    assert value("isdr_instances_refused_total", status="other") >= 2
    assert value("isdr_associations_rejected_total", reason="other") >= 1
    assert value("isdr_inference_errors_total", operation="other") >= 1
    assert value("isdr_delivery_errors_total", reason="other") >= 1
    assert value("isdr_tasks_finished_total", fingerprint="invalid", outcome="failed") >= 1
    for family, sample in all_isdr_samples():
        assert set(sample.labels) - {"le"} <= ALLOWED_LABELS, (family.name, sample.labels)
        for label in sample.labels.values():
            assert "Zebra" not in label and "PID" not in label and "^" not in label


def test_fingerprint_names_are_labels_only_when_they_are_dns_labels():
    assert metrics._fingerprint("ct-thorax-oars") == "ct-thorax-oars"
    for bad in ("CT Thorax", "a" * 64, "-ct", "ct/../x", "", None):
        assert metrics._fingerprint(bad) == "invalid"


def test_status_labels_are_four_hex_digits():
    assert metrics.status_label(0xA700) == "A700"
    assert metrics.status_label(0x0110) == "0110"
    assert metrics.status_label(0xC210) == "C210"


@pytest.mark.parametrize("source, diagnostic, reason", [
    (1, 3, "calling_ae_title"), (1, 7, "called_ae_title"), (3, 2, "association_limit"),
    (1, 1, "other"), (2, 1, "other"), (3, 1, "other"),
])
def test_an_association_rejection_is_named_by_its_source_and_diagnostic(source, diagnostic, reason):
    assert metrics.reject_reason(source, diagnostic) == reason


@dataclass
class _Instance:
    size: int


class _Sink:
    def __init__(self, fail=False):
        self.stored, self.ended, self.fail = [], [], fail

    def instance_stored(self, instance):
        if self.fail:
            raise RuntimeError("the API is down")
        self.stored.append(instance)

    def association_ended(self, calling_ae_title):
        self.ended.append(calling_ae_title)

    def pending(self):
        return 3


def test_the_counting_sink_counts_each_stored_instance_and_its_bytes_then_tells_the_real_sink():
    sink = _Sink()
    counting = metrics.CountingSink(sink)
    before, before_bytes = value("isdr_instances_received_total"), value("isdr_received_bytes_total")

    counting.instance_stored(_Instance(1000))
    counting.instance_stored(_Instance(24))
    counting.association_ended("CT01")

    assert value("isdr_instances_received_total") - before == 2
    assert value("isdr_received_bytes_total") - before_bytes == 1024
    assert [i.size for i in sink.stored] == [1000, 24] and sink.ended == ["CT01"]
    assert counting.pending() == 3  # everything else is the real sink's


def test_an_acknowledged_instance_counts_even_when_the_sink_fails_to_register_it():
    before = value("isdr_instances_received_total")
    with pytest.raises(RuntimeError):
        metrics.CountingSink(_Sink(fail=True)).instance_stored(_Instance(10))
    assert value("isdr_instances_received_total") - before == 1


class _Client:
    """An InferenceClient whose answers the test scripts."""

    def __init__(self, submits=(), polls=(), deletes=()):
        self.submits, self.polls, self.deletes = list(submits), list(polls), list(deletes)

    @staticmethod
    def _answer(queue):
        answer = queue.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def submit(self, archive, model):
        return self._answer(self.submits)

    def poll(self, uid):
        return self._answer(self.polls)

    def delete(self, uid):
        return self._answer(self.deletes)

    def archive_format(self):
        return "zip"


def test_failed_inference_requests_are_counted_by_operation():
    client = metrics.ObservedInferenceClient(_Client(
        submits=[ServerUnavailable("503", 503), SubmitRejected("no such model", 404), "uid-1"],
        polls=[PollResult("error", None, "502", 502), ServerUnavailable("refused"),
               PollResult("pending", None, "", 200)],
        deletes=[ServerUnavailable("500", 500)]))
    before = {op: value("isdr_inference_errors_total", operation=op) for op in ("submit", "poll", "delete")}
    duplicates = value("isdr_possible_duplicate_submits_total")

    for _ in range(2):
        with pytest.raises(Exception):
            client.submit("a.zip", "m")
    assert client.submit("a.zip", "m") == "uid-1"
    assert client.poll("uid-1").state == "error"  # a transient error answered
    with pytest.raises(ServerUnavailable):
        client.poll("uid-1")  # no answer at all
    assert client.poll("uid-1").state == "pending"
    with pytest.raises(ServerUnavailable):
        client.delete("uid-1")

    after = {op: value("isdr_inference_errors_total", operation=op) for op in ("submit", "poll", "delete")}
    assert after["submit"] - before["submit"] == 2
    assert after["delete"] - before["delete"] == 1
    assert after["poll"] - before["poll"] == 2
    assert value("isdr_possible_duplicate_submits_total") == duplicates  # no submit may have reached it
    assert client.archive_format() == "zip"


def test_a_polls_time_limit_reaches_the_client_and_v2s_500_counts_as_a_failed_poll():
    seen = []

    class Limited(_Client):
        def poll(self, uid, time_limit=None):
            seen.append(time_limit)
            return super().poll(uid)

    client = metrics.ObservedInferenceClient(Limited(polls=[PollResult("gone", None, "500", 500)]))
    before = value("isdr_inference_errors_total", operation="poll")
    assert client.poll("uid-3", time_limit=42.0).state == "gone"
    assert seen == [42.0]
    assert value("isdr_inference_errors_total", operation="poll") - before == 1


def test_a_task_duration_is_from_its_start_to_its_end():
    labels = {"fingerprint": "duration-rule", "outcome": "succeeded"}
    metrics.task_finished("t-1", "duration-rule", "Succeeded", started_at=1000.0, finished_at=1090.0)
    assert value("isdr_task_duration_seconds_count", **labels) == 1
    assert value("isdr_task_duration_seconds_sum", **labels) == 90
    assert value("isdr_task_duration_seconds_bucket", le="60.0", **labels) == 0
    assert value("isdr_task_duration_seconds_bucket", le="120.0", **labels) == 1


def test_without_a_recorded_start_the_duration_is_measured_from_task_started_in_this_process():
    labels = {"fingerprint": "in-process", "outcome": "failed"}
    metrics.task_started("t-2", "in-process")
    # Both outcomes exist from the start, so that an alert's increase() sees the first failure.
    assert metrics.REGISTRY.get_sample_value("isdr_tasks_finished_total", labels) == 0
    metrics.task_finished("t-2", "in-process", "Failed")
    metrics.task_finished("t-unknown", "in-process", "Failed")  # started elsewhere: counted, not timed
    assert value("isdr_tasks_started_total", fingerprint="in-process") == 1
    assert value("isdr_tasks_finished_total", **labels) == 2
    assert value("isdr_task_duration_seconds_count", **labels) == 1


def test_the_task_clock_forgets_the_oldest_tasks_beyond_its_limit(monkeypatch):
    clock = metrics._TaskClock()
    monkeypatch.setattr(clock, "LIMIT", 3)
    for n in range(5):
        clock.start(f"t{n}")
    assert clock.stop("t0") is None and clock.stop("t1") is None
    assert clock.stop("t4") is not None


def collected(collector) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}


def test_series_and_tasks_are_counted_by_phase_with_every_phase_present():
    source = [("Receiving", ()), ("Dispatched", ("Running", "Pending")), ("Dispatched", ("Delivering",)),
              ("Succeeded", ("Succeeded",)), ("Bogus", ("Bogus",))]
    samples = collected(metrics.SeriesCollector(lambda: iter(source)))
    assert samples[("isdr_series", (("phase", "Dispatched"),))] == 2
    assert samples[("isdr_series", (("phase", "Failed"),))] == 0
    assert samples[("isdr_series", (("phase", "other"),))] == 1
    assert samples[("isdr_tasks", (("phase", "Running"),))] == 1
    assert samples[("isdr_tasks", (("phase", "Submitting"),))] == 0
    assert {phase for (name, ((_, phase),)) in samples if name == "isdr_series"} == {
        "Receiving", "Dispatched", "Succeeded", "Failed", "Unmatched", "other"}
    assert ("isdr_series", (("phase", "other"),)) not in collected(metrics.SeriesCollector(lambda: []))


def test_free_storage_is_read_when_scraped_and_absent_where_the_storage_cannot_tell(tmp_path):
    samples = collected(metrics.StorageCollector(LocalStorage(tmp_path), reserve_bytes=1234))
    assert samples[("isdr_storage_free_bytes", ())] > 0
    assert samples[("isdr_storage_reserve_bytes", ())] == 1234

    class Bucket:
        def free_bytes(self):
            return None

    assert collected(metrics.StorageCollector(Bucket())) == {}


def test_metrics_port_is_a_setting_with_a_default_and_zero_turns_it_off():
    assert load_settings({}).metrics_port == 9120
    assert load_settings({"METRICS_PORT": "0"}).metrics_port == 0
    for bad in ("70000", "-1", "x"):
        with pytest.raises(ConfigError, match="METRICS_PORT"):
            load_settings({"METRICS_PORT": bad})


def test_port_zero_serves_nothing():
    assert metrics.serve(0) is None


def test_the_endpoint_serves_the_relay_metrics_and_the_process_collectors(tmp_path):
    endpoint = metrics.serve(free_port(), [metrics.StorageCollector(LocalStorage(tmp_path), 5)], host="127.0.0.1")
    try:
        text = requests.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10).text
    finally:
        endpoint.stop()
    assert 'isdr_build_info{version="' in text
    assert "isdr_storage_reserve_bytes 5.0" in text
    assert "isdr_instances_received_total" in text and "process_resident_memory_bytes" in text
    assert "_created" not in text  # no second series per counter


def test_a_taken_port_leaves_the_relay_running_without_metrics_and_says_so(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.ERROR, logger="relay.metrics"):
            assert metrics.serve(taken.getsockname()[1], host="127.0.0.1") is None
    assert "running without metrics" in caplog.text


def test_the_errors_a_process_counted_are_what_a_job_reports_and_the_operator_adds_them_up():
    before = metrics.errors_counted()
    metrics.inference_error("poll")
    metrics.delivery_error(metrics.DELIVERY_REFUSED)
    metrics.delivery_error(metrics.DELIVERY_REFUSED)
    counted = metrics.errors_counted()
    assert set(counted) <= set(metrics.ERROR_KINDS)
    assert counted["inference_poll"] - before.get("inference_poll", 0) == 1
    assert counted["delivery_refused"] - before.get("delivery_refused", 0) == 2

    metrics.errors_reported({"inference_poll": 3, "delivery_unavailable": 1})
    assert value("isdr_inference_errors_total", operation="poll") == counted["inference_poll"] + 3
    assert value("isdr_delivery_errors_total", reason="unavailable") == before.get("delivery_unavailable", 0) + 1


def test_a_reported_error_of_no_known_kind_or_count_adds_nothing():
    before = metrics.errors_counted()
    metrics.errors_reported({"inference_upload": 5, "patient_Zebra": 1, "delivery_refused": 0, "inference_poll": -2})
    assert metrics.errors_counted() == before
