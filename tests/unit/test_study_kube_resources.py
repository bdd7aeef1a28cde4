"""How study-level fingerprints read and write Kubernetes objects: the study label on a DicomSeries
and on a study task's Job, a share's task entry, and the study decisions as status patches."""

from __future__ import annotations

from relay.fingerprints.model import SeriesAttributes
from relay.kube.resources import (
    LABEL_STUDY,
    dispatch_status,
    new_series,
    resource_name,
    series_state,
    study_label,
    study_selector,
    study_share_status,
    to_rfc3339,
)
from relay.lifecycle import FailStudy, StartStudy, TaskPhase, TaskState
from relay.uids import SeriesKey
from isdr_operator.jobs import build_job
from isdr_operator.settings import load_operator_settings
from tests.unit.test_operator_rules import fingerprint_body

MR = "1.2.840.10008.5.1.4.1.1.4"
KEY = SeriesKey("1.2.826.0.1.3680043.8.498.7", MR)
STUDY = "1.2.826.0.1.3680043.8.498.1"
T0 = 1_700_000_000.0


def series(status: dict | None = None) -> dict:
    attributes = SeriesAttributes(modality="MR", sop_class_uid=MR, series_description="T2 tra", study_uid=STUDY)
    body = new_series(KEY, STUDY, attributes, {"type": "local", "prefix": KEY.prefix})
    body["metadata"].update(resourceVersion="3", generation=1)
    if status is not None:
        body["status"] = status
    return body


SHARE = TaskState(task_id="prostate-abc-1", fingerprint="prostate", generation=1, phase=TaskPhase.WAITING,
                  entry="t2")


def waiting() -> dict:
    body = series({"lastReceived": to_rfc3339(T0)})
    body["status"].update(dispatch_status(body, series_state(body), [SHARE], 2, T0))
    return body


def test_a_series_of_a_study_is_labelled_with_a_digest_of_its_study_uid_and_reads_it_back():
    body = series()
    assert body["metadata"]["labels"][LABEL_STUDY] == study_label(STUDY)
    assert STUDY not in study_label(STUDY) and len(study_label(STUDY)) <= 63
    assert study_selector(STUDY) == f"{LABEL_STUDY}={study_label(STUDY)}"
    assert series_state(body).attributes.study_uid == STUDY


def test_a_series_without_a_study_uid_has_no_study_label():
    body = new_series(KEY, None, SeriesAttributes(modality="MR"), {"type": "local", "prefix": KEY.prefix})
    assert LABEL_STUDY not in body["metadata"]["labels"]


def test_a_share_is_a_waiting_entry_that_names_its_entry_and_reads_back_with_its_start():
    body = waiting()
    (entry,) = body["status"]["tasks"]
    assert (entry["phase"], entry["entry"]) == ("Waiting", "t2")
    (task,) = series_state(body).tasks
    assert (task.phase, task.entry, task.updated_at) == (TaskPhase.WAITING, "t2", T0)


def test_starting_the_study_makes_the_share_the_study_task_pending():
    start = StartStudy(task_id="prostate-def-s1", parts=(), shares=((KEY, SHARE.task_id),))
    (entry,) = study_share_status(waiting(), start, T0 + 5)["tasks"]
    assert (entry["taskId"], entry["job"], entry["phase"], entry["entry"]) == (
        "prostate-def-s1", "prostate-def-s1", "Pending", "t2")


def test_failing_the_study_fails_the_share_with_the_reason():
    fail = FailStudy(shares=((KEY, SHARE.task_id),), message="no series for adc")
    (entry,) = study_share_status(waiting(), fail, T0 + 5)["tasks"]
    assert (entry["phase"], entry["message"]) == ("Failed", "no series for adc")


def test_a_decision_about_other_series_changes_nothing_here():
    other = SeriesKey("1.2.826.0.1.3680043.8.498.8", MR)
    assert study_share_status(waiting(), StartStudy("x-s1", (), ((other, SHARE.task_id),)), T0) is None


def test_a_study_tasks_job_carries_the_study_label_and_a_series_task_none():
    settings = load_operator_settings("ns", {})
    study_task = TaskState(task_id="prostate-def-s1", fingerprint="prostate", generation=1, entry="t2")
    job = build_job(task=study_task, key=KEY, series_name=resource_name(KEY), fingerprint_body=fingerprint_body(),
                    settings=settings.jobs, relay_get_timeout=7200, study_uid=STUDY)
    assert job["metadata"]["labels"][LABEL_STUDY] == study_label(STUDY)
    series_task = TaskState(task_id="ct-abc-1", fingerprint="ct", generation=1)
    job = build_job(task=series_task, key=KEY, series_name=resource_name(KEY), fingerprint_body=fingerprint_body(),
                    settings=settings.jobs, relay_get_timeout=7200, study_uid=STUDY)
    assert LABEL_STUDY not in job["metadata"]["labels"]
