"""The vocabulary of ISDR's Kubernetes objects as rules (relay.kube.resources), the API's error
taxonomy (relay.kube.api) and the contract between the operator and a Job's pod
(relay.kube.job_contract): pure functions over plain dicts, no cluster."""

from __future__ import annotations

import pytest

from relay.config import Settings
from relay.fingerprints.model import SeriesAttributes
from relay.kube.api import AlreadyExists, ApiError, ApiUnavailable, Conflict, Forbidden, NotFound, Rejected, error_for
from relay.kube.job_command import add_parser
from relay.kube.job_contract import job_command_line
from relay.kube.resources import (
    MATCHED_SERIES,
    ConditionType,
    Reason,
    TaskReport,
    condition,
    counter_status,
    dispatch_status,
    decision_status,
    failed_task_status,
    finished_task_ids,
    finish_status,
    new_counts,
    new_series,
    published,
    ready_status,
    received_status,
    resource_name,
    series_phases,
    series_state,
    status_unchanged,
    storage_location,
    task_change,
    to_rfc3339,
)
from relay.lifecycle import SeriesPhase, TaskPhase, TaskState
from relay.uids import SeriesKey

CT = "1.2.840.10008.5.1.4.1.1.2"
KEY = SeriesKey("1.2.826.0.1.3680043.8.498.1", CT)
ATTRIBUTES = SeriesAttributes(modality="CT", sop_class_uid=CT, series_description="Thorax 1mm",
                              study_description="CT chest")
T0 = 1_700_000_000.0


def series(status: dict | None = None, version: str = "7") -> dict:
    body = new_series(KEY, "1.2.3", ATTRIBUTES, {"type": "local", "prefix": KEY.prefix})
    body["metadata"].update(resourceVersion=version, generation=1)
    if status is not None:
        body["status"] = status
    return body


def entry(task_id: str = "ct-organs-1", phase: str = "Pending", **more) -> dict:
    return {"taskId": task_id, "fingerprint": "ct-organs", "generation": 1, "job": task_id, "phase": phase,
            "startTime": to_rfc3339(T0), **more}


# --- what the receiver writes ------------------------------------------------------------------


def test_the_receivers_status_for_a_new_object_sets_everything():
    patch = received_status({"status": {}}, instances=3, first_received=T0, last_received=T0 + 2, pod_name="a")
    assert patch == {"instances": 3, "firstReceived": to_rfc3339(T0), "lastReceived": to_rfc3339(T0 + 2),
                     "receivedBy": ["a"], "phase": "Receiving"}


def test_the_receivers_status_keeps_earliest_first_latest_last_and_unions_receivers():
    existing = {"instances": 5, "firstReceived": to_rfc3339(T0), "lastReceived": to_rfc3339(T0 + 10),
                "receivedBy": ["b"], "phase": "Receiving"}
    # Ours is inside the existing window: neither time moves.
    patch = received_status({"status": existing}, instances=7, first_received=T0 + 1, last_received=T0 + 9, pod_name="a")
    assert patch == {"instances": 7, "receivedBy": ["b", "a"]}
    # Ours is outside it on both sides.
    patch = received_status({"status": existing}, instances=5, first_received=T0 - 1, last_received=T0 + 11, pod_name="b")
    assert patch == {"firstReceived": to_rfc3339(T0 - 1), "lastReceived": to_rfc3339(T0 + 11)}


def test_the_receivers_status_is_empty_when_nothing_changes():
    existing = {"instances": 5, "firstReceived": to_rfc3339(T0), "lastReceived": to_rfc3339(T0 + 10),
                "receivedBy": ["a"], "phase": "Dispatched"}
    assert received_status({"status": existing}, instances=5, first_received=T0 + 10, last_received=T0 + 10,
                        pod_name="a") == {}


def test_the_receivers_status_never_touches_the_operators_phase():
    existing = {"instances": 5, "phase": "Dispatched", "tasks": [{"taskId": "x"}], "generation": 1}
    patch = received_status({"status": existing}, instances=6, first_received=T0, last_received=T0, pod_name="a")
    assert "phase" not in patch and "tasks" not in patch and "generation" not in patch
    assert patch["instances"] == 6


def test_the_receivers_status_caps_received_by_dropping_the_oldest():
    existing = {"receivedBy": [f"r{i}" for i in range(10)], "phase": "Receiving"}
    patch = received_status({"status": existing}, instances=1, first_received=None, last_received=None, pod_name="new",
                         max_received_by=10)
    assert patch["receivedBy"] == [f"r{i}" for i in range(1, 10)] + ["new"]


def test_the_receivers_status_survives_unparsable_times():
    existing = {"firstReceived": "yesterday", "lastReceived": 12, "phase": "Receiving", "receivedBy": ["a"],
                "instances": 1}
    patch = received_status({"status": existing}, instances=1, first_received=T0, last_received=T0, pod_name="a")
    assert patch == {"firstReceived": to_rfc3339(T0), "lastReceived": to_rfc3339(T0)}


def test_storage_location_local_and_s3():
    assert storage_location(Settings(), KEY) == {"type": "local", "prefix": KEY.prefix}
    s3 = Settings(storage="s3", s3_bucket="dicom", s3_prefix="site-a", s3_endpoint_url="http://minio:9000")
    assert storage_location(s3, KEY) == {"type": "s3", "bucket": "dicom", "endpoint": "http://minio:9000",
                                         "prefix": f"site-a/{KEY.prefix}"}
    assert storage_location(Settings(storage="s3", s3_bucket="dicom"), KEY) == {
        "type": "s3", "bucket": "dicom", "prefix": KEY.prefix}


def test_each_http_status_has_one_error_of_the_taxonomy():
    assert isinstance(error_for(0, "refused"), ApiUnavailable)
    assert isinstance(error_for(503, "x"), ApiUnavailable)
    assert isinstance(error_for(429, "x"), ApiUnavailable)
    assert isinstance(error_for(409, "x"), Conflict)
    assert isinstance(error_for(404, "x"), NotFound)
    error = error_for(422, "spec.modality: Too long")
    assert isinstance(error, Rejected) and error.status == 422 and "Too long" in str(error)
    assert isinstance(error_for(403, "no"), Forbidden) and isinstance(error_for(403, "no"), Rejected)
    # Every one of them is an ApiError, so that a caller can catch "the API failed" at once.
    assert all(isinstance(error_for(status, "x"), ApiError) for status in (0, 400, 401, 403, 404, 409, 422, 500))




def test_a_new_series_object_carries_identity_and_storage_but_no_status_and_no_patient_data():
    body = new_series(KEY, "1.2.3", ATTRIBUTES, storage_location(Settings(), KEY))
    assert body["metadata"]["name"] == resource_name(KEY) and "status" not in body
    assert body["spec"]["seriesInstanceUID"] == KEY.series_uid and body["spec"]["studyInstanceUID"] == "1.2.3"
    assert not {"patientName", "patientID", "patientBirthDate"} & set(body["spec"])


def test_a_series_is_published_once_it_has_a_count():
    assert published(None) is None and published(series()) is None
    assert published(series({"instances": 3, "lastReceived": to_rfc3339(T0)})) == (3, T0)
    assert published(series({"instances": 3, "lastReceived": "garbage"})) == (3, None)


# --- what the operator reads and decides -------------------------------------------------------


def test_an_object_without_status_reads_as_a_receiving_series_with_nothing_received():
    state = series_state(series())
    assert state.phase == SeriesPhase.RECEIVING and state.instance_count == 0 and state.tasks == ()
    assert series_phases(series()) == ("Receiving", ())


def test_dispatch_adds_one_pending_entry_per_new_task_and_keeps_the_earlier_ones():
    body = series({"tasks": [entry("old-1", "Succeeded")], "generation": 1})
    new = TaskState(task_id="ct-organs-2", fingerprint="ct-organs", generation=2)
    dispatched = series_state(body)
    status = dispatch_status(body, dispatched, [new], instances=4, now=T0)
    assert [t["taskId"] for t in status["tasks"]] == ["old-1", "ct-organs-2"]
    assert status["tasks"][1]["phase"] == "Pending" and status["tasks"][1]["job"] == "ct-organs-2"
    assert status["dispatchedInstances"] == 4 and status["dispatchedTime"] == to_rfc3339(T0)
    assert status["progress"] == "0/1"  # the latest dispatch only


def test_failing_a_task_sets_its_phase_message_and_completion_and_nothing_else():
    body = series({"tasks": [entry("a"), entry("b", "Running")]})
    status = failed_task_status(body, "a", "fingerprint deleted", now=T0)
    a, b = status["tasks"]
    assert (a["phase"], a["message"], a["completionTime"]) == ("Failed", "fingerprint deleted", to_rfc3339(T0))
    assert b == entry("b", "Running")
    assert body["status"]["tasks"][0]["phase"] == "Pending", "the object read is not changed"


def test_a_finished_series_says_which_fingerprints_failed_and_why_in_its_complete_condition():
    body = series({"tasks": [entry("a", "Failed", message="HTTP 500"), entry("b", "Succeeded")]})
    status, message = finish_status(body, series_state(body), ok=False, now=T0)
    assert message == "ct-organs: HTTP 500"
    (complete,) = status["conditions"]
    assert (complete["type"], complete["status"], complete["reason"]) == ("Complete", "True", "TaskFailed")
    status, message = finish_status(body, series_state(body), ok=True, now=T0)
    assert message == "every task succeeded" and status["conditions"][0]["reason"] == Reason.TASKS_SUCCEEDED


def test_a_report_moves_a_task_forward_and_records_the_inference_uid_once():
    body = series({"tasks": [entry()]})
    change = task_change(body, "ct-organs-1", TaskReport(TaskPhase.RUNNING, "polling", "uid-1"), now=T0)
    assert change.first_uid and not change.finished
    assert change.entry["inferenceTaskUID"] == "uid-1" and change.status["progress"] == "0/1"
    again = series({"tasks": [change.entry]})
    assert task_change(again, "ct-organs-1", TaskReport(TaskPhase.RUNNING, "polling", "uid-1"), T0) is None


def test_a_task_is_finished_once_whatever_reports_follow():
    body = series({"tasks": [entry(phase="Running")]})
    change = task_change(body, "ct-organs-1", TaskReport(TaskPhase.SUCCEEDED, "delivered"), now=T0)
    assert change.finished and change.entry["completionTime"] == to_rfc3339(T0)
    done = series({"tasks": [change.entry]})
    assert task_change(done, "ct-organs-1", TaskReport(TaskPhase.SUCCEEDED, "delivered"), T0 + 5) is None
    assert task_change(done, "ct-organs-1", TaskReport(TaskPhase.FAILED, "a late, stale event"), T0 + 5) is None


def test_a_report_about_an_unknown_task_changes_nothing():
    assert task_change(series({"tasks": [entry()]}), "other", TaskReport(TaskPhase.RUNNING, ""), T0) is None
    assert task_change(series(), "other", TaskReport(TaskPhase.RUNNING, ""), T0) is None


def test_errors_a_job_reports_are_new_only_beyond_what_the_entry_already_counted():
    body = series({"tasks": [entry(phase="Running", errors={"inference_poll": 2})]})
    report = TaskReport(TaskPhase.RUNNING, "", errors={"inference_poll": 3, "delivery_refused": 1})
    change = task_change(body, "ct-organs-1", report, T0)
    assert change.new_errors == {"inference_poll": 1, "delivery_refused": 1}
    assert change.entry["errors"] == {"inference_poll": 3, "delivery_refused": 1}
    # The same record read again (an operator restart, another Job event): nothing new to count.
    assert task_change(series({"tasks": [change.entry]}), "ct-organs-1", report, T0) is None


def test_a_record_older_than_what_was_counted_counts_nothing_and_lowers_nothing():
    assert new_counts({"inference_poll": 3}, {"inference_poll": 1}) == {}
    assert new_counts({}, {"inference_poll": True, "delivery_refused": "7", "inference_submit": 2}) == {
        "inference_submit": 2}


# --- Fingerprints ------------------------------------------------------------------------------


def test_a_fingerprints_ready_status_is_written_only_when_it_changes():
    body = {"metadata": {"name": "fp", "generation": 2}}
    ready = condition(ConditionType.READY, True, Reason.VALID, "ok", 2)
    status = ready_status(body, ready, now=T0)
    assert status["observedGeneration"] == 2 and status["conditions"][0]["reason"] == "Valid"
    assert ready_status({**body, "status": status}, ready, now=T0 + 60) is None
    body["metadata"]["generation"] = 3  # a new spec, the same verdict: observedGeneration follows
    assert ready_status({**body, "status": status}, ready, now=T0 + 60)["observedGeneration"] == 3


def test_a_fingerprint_counter_counts_on_from_the_object_and_a_match_notes_its_time():
    body = {"metadata": {"name": "fp"}, "status": {MATCHED_SERIES: 4}}
    assert counter_status(body, MATCHED_SERIES, T0) == {MATCHED_SERIES: 5, "lastMatchTime": to_rfc3339(T0)}
    assert counter_status({"metadata": {"name": "fp"}}, "failedTasks", T0) == {"failedTasks": 1}


# --- the API's errors ---------------------------------------------------------------------------


def test_a_create_that_finds_the_object_there_is_a_conflict_of_its_own_kind():
    assert issubclass(AlreadyExists, Conflict) and issubclass(Conflict, ApiError)
    assert not issubclass(NotFound, ApiUnavailable)


# --- the contract between the operator and the Job's pod --------------------------------------


def test_the_arguments_the_operator_gives_a_job_are_the_ones_isdr_job_reads():
    import argparse

    command, args = job_command_line("ct-organs-abc", KEY, 3)
    assert command == ["isdr", "job"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["job", *args])
    assert (parsed.task_id, parsed.series_uid, parsed.sop_class_uid, parsed.generation) == (
        "ct-organs-abc", KEY.series_uid, KEY.sop_class_uid, 3)


@pytest.mark.parametrize("text", ["2024-01-02T03:04:05.123456Z", "2024-01-02T03:04:05Z"])
def test_times_are_written_to_the_microsecond_and_read_back(text):
    from relay.kube.resources import from_rfc3339

    assert to_rfc3339(from_rfc3339(text)).startswith(text.rstrip("Z"))


def test_a_jobs_record_carries_the_errors_of_its_earlier_pods_plus_its_own():
    from relay.kube.job_contract import with_errors
    from relay.state_store import task_from_dict, task_to_dict

    # (The runner's copy of the record says what the pod resumed from: `before` is that.)
    task = TaskState(task_id="t", fingerprint="ct-organs", generation=1, errors={"inference_poll": 2})
    recorded = with_errors(task, before={"inference_poll": 2, "delivery_refused": 1},
                           counted={"inference_poll": 1, "inference_submit": 0, "not_a_kind": 4})
    assert recorded.errors == {"inference_poll": 3, "delivery_refused": 1}
    assert task_from_dict(task_to_dict(recorded)).errors == recorded.errors
    assert task_from_dict({"task_id": "t", "fingerprint": "f", "generation": 1}).errors == {}


def test_a_status_patch_that_changes_nothing_is_recognised_as_such():
    body = series({"instances": 3, "lastReceived": to_rfc3339(100.0), "phase": "Succeeded", "generation": 1,
                   "instancesDeleted": True, "completedTime": to_rfc3339(90.0), "lateInstances": 0,
                   "tasks": [entry(phase="Succeeded")]})
    state = series_state(body)
    assert status_unchanged(body, decision_status(state))  # lateSeen None: absent is the same
    assert status_unchanged(body, {"tasks": [entry(phase="Succeeded")]})
    assert not status_unchanged(body, {"tasks": [entry(phase="Failed")]})
    assert not status_unchanged(body, {"instancesDeleted": False})
    assert not status_unchanged(body, {"completedTime": None})  # removing a field is a change
    assert not status_unchanged(series(), {"phase": "Receiving"})


def test_the_tasks_a_series_says_finished_are_the_succeeded_and_failed_ones():
    body = series({"tasks": [entry("a", "Succeeded"), entry("b", "Failed"), entry("c", "Running"), entry("d")]})
    assert finished_task_ids(body) == {"a", "b"}


def test_a_pending_report_about_a_pending_task_without_a_message_changes_nothing():
    body = series({"tasks": [entry()]})
    assert task_change(body, "ct-organs-1", TaskReport(TaskPhase.PENDING, ""), T0) is None
