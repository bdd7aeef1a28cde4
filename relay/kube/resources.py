"""The vocabulary of ISDR's Kubernetes objects, and their `status` <-> the core's plain state.

One module says what the objects are called (group, version, plurals, kinds, labels), which
conditions and reasons they carry, which Events the operator posts, and how a `DicomSeries`,
a `Fingerprint`, a Job or kopf's peering object reads and is written. The receiver (relay.kube.
publisher), the operator (isdr_operator) and the tests all speak it; nothing else indexes an
object's `status` by hand (tests/unit/test_kube_layers.py holds that line). Pure functions over
plain dicts: no API calls here (relay.kube.api makes them), no `kubernetes` import.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Mapping

from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import (
    TERMINAL_TASK_PHASES,
    FailStudy,
    AdminAction,
    JobOutcome,
    SeriesPhase,
    SeriesState,
    StartStudy,
    TaskPhase,
    TaskState,
    accept_task_phase,
    progress,
)
from relay.uids import SeriesKey

# --- names ---------------------------------------------------------------------------------------

GROUP = "isdr.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SERIES_PLURAL = "dicomseries"
SERIES_KIND = "DicomSeries"
FINGERPRINT_PLURAL = "fingerprints"
FINGERPRINT_KIND = "Fingerprint"
# kopf's peering object (its own CRD, kopfpeerings.kopf.dev), read by the operator's gate.
PEERING_GROUP, PEERING_VERSION, PEERING_PLURAL = "kopf.dev", "v1", "kopfpeerings"

# Labels that tie Jobs (and Events' objects) to their series and fingerprint.
LABEL_SERIES = "isdr.io/series"
LABEL_FINGERPRINT = "isdr.io/fingerprint"
LABEL_TASK = "isdr.io/task"
# On a DicomSeries and on a study task's Job: which study (a digest of its Study Instance UID, so
# that the operator finds the series of one study with a label selector).
LABEL_STUDY = "isdr.io/study"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "isdr-operator"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PART_OF = "isdr"
ANNOTATION_SERIES_UID = "isdr.io/series-instance-uid"
# An administrator's requests on a DicomSeries: `kubectl annotate dicomseries NAME isdr.io/retry=<a
# new value> --overwrite`. The operator answers each new value once, in status.requests.
ANNOTATION_RETRY = "isdr.io/retry"
ANNOTATION_CANCEL = "isdr.io/cancel"
ANNOTATION_REMATCH = "isdr.io/rematch"


class ConditionType(StrEnum):
    READY = "Ready"  # a Fingerprint can be used
    COMPLETE = "Complete"  # a DicomSeries' tasks all finished


class Reason(StrEnum):
    """The reasons of conditions (Ready on a Fingerprint, Complete on a DicomSeries)."""

    VALID = "Valid"
    INVALID_SPEC = "InvalidSpec"
    INVALID_REGEX = "InvalidRegex"
    UNSUPPORTED_REGEX = "UnsupportedRegex"  # valid for a backtracking engine, refused by RE2
    UNSUPPORTED_CA_BUNDLE = "UnsupportedCABundle"
    CA_BUNDLE_NOT_FOUND = "CABundleNotFound"
    UNSUPPORTED_DESTINATION_TLS = "UnsupportedDestinationTLS"
    DESTINATION_TLS_NOT_FOUND = "DestinationTLSNotFound"
    TASKS_SUCCEEDED = "TasksSucceeded"
    TASK_FAILED = "TaskFailed"


class EventReason(StrEnum):
    """The reasons of the Events the operator posts (the fingerprint's Ready reasons too)."""

    DISPATCHED = "Dispatched"
    MATCHED = "Matched"  # on the Fingerprint
    LATE_INSTANCES = "LateInstances"
    DUPLICATE_INSTANCES = "DuplicateInstances"
    LATE_INSTANCES_DELETED = "LateInstancesDeleted"
    UNMATCHED = "Unmatched"
    TASK_SUCCEEDED = "TaskSucceeded"
    TASK_FAILED = "TaskFailed"
    POSSIBLE_DUPLICATE_SUBMIT = "PossibleDuplicateSubmit"
    SUCCEEDED = "Succeeded"  # the series
    FAILED = "Failed"
    STUDY_STARTED = "StudyStarted"  # a study-level fingerprint's task starts, with this series
    STUDY_FAILED = "StudyFailed"  # ... or fails: its missing series did not come in time
    RETRIED = "Retried"  # an administrator's isdr.io/retry, carried out
    RETRY_REFUSED = "RetryRefused"
    CANCELLED = "Cancelled"  # an administrator's isdr.io/cancel, carried out
    CANCEL_REFUSED = "CancelRefused"
    REMATCHED = "Rematched"  # an administrator's isdr.io/rematch, carried out
    REMATCH_REFUSED = "RematchRefused"


# Counters on a Fingerprint's status.
MATCHED_SERIES, SUCCEEDED_TASKS, FAILED_TASKS = "matchedSeries", "succeededTasks", "failedTasks"


def resource_name(key: SeriesKey) -> str:
    """`series-<digest>`: deterministic, a valid name and label value, no patient data."""
    return "series-" + hashlib.sha256(key.slug.encode()).hexdigest()[:40]


def study_label(study_uid: str) -> str:
    """`study-<digest>`: a valid label value for a Study Instance UID (at most 64 characters)."""
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:40]


def study_selector(study_uid: str) -> str:
    return f"{LABEL_STUDY}={study_label(study_uid)}"


def to_rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _parse_time(text) -> float | None:
    """A timestamp written by someone else: None when absent or unreadable."""
    try:
        return from_rfc3339(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _status(body: Mapping | None) -> dict:
    """The one place an object's status is read: {} for an object that has none yet."""
    status = (body or {}).get("status")
    return status if isinstance(status, dict) else {}


# --- conditions (the Kubernetes API conventions) --------------------------------------------------


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> dict:
    return {
        "type": str(type_),
        "status": "True" if ok else "False",
        "reason": str(reason),
        "message": message[:1000],
        "observedGeneration": generation,
    }


def set_condition(conditions: list[dict] | None, new: dict, now: float) -> list[dict]:
    """`conditions` with `new` in place of its type; lastTransitionTime moves only on a change
    of status, so that it tells when the condition last flipped, not when it was last written."""
    result, found = [], False
    for existing in conditions or []:
        if existing.get("type") != new["type"]:
            result.append(existing)
            continue
        found = True
        changed = existing.get("status") != new["status"]
        transition = to_rfc3339(now) if changed else existing.get("lastTransitionTime") or to_rfc3339(now)
        result.append({**new, "lastTransitionTime": transition})
    if not found:
        result.append({**new, "lastTransitionTime": to_rfc3339(now)})
    return result


def same_conditions(a: list[dict] | None, b: list[dict] | None) -> bool:
    strip = lambda items: sorted(  # noqa: E731
        ({k: v for k, v in c.items() if k != "lastTransitionTime"} for c in items or []),
        key=lambda c: c["type"])
    return strip(a) == strip(b)


# --- DicomSeries: what the receiver writes --------------------------------------------------------

MAX_RECEIVED_BY = 10


def storage_location(settings, key: SeriesKey) -> dict:
    """spec.storage: where a Job finds the series' instances (`settings`: relay.config.Settings)."""
    if settings.storage == "s3":
        location = {"type": "s3", "bucket": settings.s3_bucket}
        if settings.s3_endpoint_url:
            location["endpoint"] = settings.s3_endpoint_url
        prefix = settings.s3_prefix.strip("/")
        location["prefix"] = f"{prefix}/{key.prefix}" if prefix else key.prefix
        return location
    return {"type": "local", "prefix": key.prefix}


def series_spec(key: SeriesKey, study_uid: str | None, attributes: SeriesAttributes,
                storage: dict) -> dict:
    spec = {
        "seriesInstanceUID": key.series_uid,
        "sopClassUID": key.sop_class_uid,
        "modality": attributes.modality,
        "seriesDescription": attributes.series_description,
        "studyDescription": attributes.study_description,
        "storage": storage,
    }
    if study_uid:
        spec["studyInstanceUID"] = study_uid
    return spec


def new_series(key: SeriesKey, study_uid: str | None, attributes: SeriesAttributes, storage: dict) -> dict:
    """A DicomSeries as the receiver creates it (no status: the API server ignores it on create)."""
    labels = {LABEL_PART_OF: PART_OF}
    if study_uid:
        labels[LABEL_STUDY] = study_label(study_uid)
    return {
        "apiVersion": API_VERSION,
        "kind": SERIES_KIND,
        "metadata": {"name": resource_name(key), "labels": labels},
        "spec": series_spec(key, study_uid, attributes, storage),
    }


def published(body: dict | None) -> tuple[int, float | None] | None:
    """(instances, lastReceived) a receiver published on the object; None before its first status."""
    status = _status(body)
    if "instances" not in status:
        return None
    return int(status.get("instances") or 0), _parse_time(status.get("lastReceived"))


def received_status(body: dict | None, *, instances: int, first_received: float | None,
                    last_received: float | None, pod_name: str, max_received_by: int = MAX_RECEIVED_BY) -> dict:
    """The receiver's status fields merged with the object's; only the fields that change.

    firstReceived is the earlier, lastReceived the later of ours and the object's; receivedBy gains
    this pod (the oldest names drop out beyond `max_received_by`); phase is set to Receiving only
    when the object has none (a new object). The operator's fields are never written. Returns {}
    when nothing would change.
    """
    existing = _status(body)
    patch: dict = {}
    if existing.get("instances") != instances:
        patch["instances"] = instances

    first = earliest(_parse_time(existing.get("firstReceived")), first_received)
    if first is not None and _parse_time(existing.get("firstReceived")) != first:
        patch["firstReceived"] = to_rfc3339(first)

    last = latest(_parse_time(existing.get("lastReceived")), last_received)
    if last is not None and _parse_time(existing.get("lastReceived")) != last:
        patch["lastReceived"] = to_rfc3339(last)

    received_by = [name for name in existing.get("receivedBy") or [] if isinstance(name, str)]
    if pod_name not in received_by:
        patch["receivedBy"] = (received_by + [pod_name])[-max_received_by:]

    if not existing.get("phase"):
        patch["phase"] = str(SeriesPhase.RECEIVING)
    return patch


def earliest(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


def latest(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return max(values) if values else None


# --- DicomSeries: what the operator reads and decides ---------------------------------------------


def key_of(body: dict) -> SeriesKey:
    spec = body["spec"]
    return SeriesKey(spec["seriesInstanceUID"], spec["sopClassUID"])


def has_received(body: dict) -> bool:
    """A receiver published its first status (an object just created has none yet)."""
    return bool(_status(body).get("lastReceived"))


def series_state(body: dict) -> SeriesState:
    """The core's view of a DicomSeries (the stored instances and the dispatch records are in
    storage: a driver adds them when the rules ask, see relay.lifecycle.ListStorage)."""
    spec, status = body["spec"], _status(body)
    key = key_of(body)
    tasks = tuple(
        TaskState(
            task_id=task["taskId"],
            fingerprint=task["fingerprint"],
            generation=int(task.get("generation", 1)),
            phase=TaskPhase(task.get("phase") or TaskPhase.PENDING),
            inference_uid=task.get("inferenceTaskUID"),
            message=task.get("message", ""),
            entry=task.get("entry", ""),
            updated_at=from_rfc3339(task.get("startTime")) or 0.0,
        )
        for task in status.get("tasks") or []
    )
    # Arrivals up to lateSeen were looked at; objects written before it existed: up to the dispatch.
    seen = from_rfc3339(status.get("lateSeen")) or from_rfc3339(status.get("dispatchedTime")) or 0.0
    return SeriesState(
        key=key,
        attributes=SeriesAttributes(
            modality=spec.get("modality", ""),
            sop_class_uid=key.sop_class_uid,
            series_description=spec.get("seriesDescription", ""),
            study_description=spec.get("studyDescription", ""),
            study_uid=spec.get("studyInstanceUID", ""),
        ),
        phase=SeriesPhase(status.get("phase") or SeriesPhase.RECEIVING),
        first_received=from_rfc3339(status.get("firstReceived")) or 0.0,
        last_received=from_rfc3339(status.get("lastReceived")) or 0.0,
        instance_count=int(status.get("instances") or 0),
        generation=int(status.get("generation") or 0),
        arrivals_seen=seen,
        late_instances=int(status.get("lateInstances") or 0),
        tasks=tasks,
        finished_at=from_rfc3339(status.get("completedTime")),
        cleaned=bool(status.get("instancesDeleted")),
    )


def finished_task_ids(body: dict) -> set[str]:
    """The tasks the DicomSeries' status says finished (their Jobs have nothing left to tell)."""
    return {str(task.get("taskId")) for task in _status(body).get("tasks") or []
            if task.get("phase") in TERMINAL_TASK_PHASES}


def is_receiving(body: dict) -> bool:
    """Whether the DicomSeries is still receiving (not dispatched since its last instances)."""
    return (_status(body).get("phase") or SeriesPhase.RECEIVING) == SeriesPhase.RECEIVING


def tasks_under_way(body: dict) -> bool:
    """Whether the DicomSeries' status shows a task that has not finished."""
    return any(task.get("phase") not in TERMINAL_TASK_PHASES for task in _status(body).get("tasks") or [])


def merged_is_same(current, patch) -> bool:
    """Whether merging `patch` into `current` (JSON merge patch, RFC 7386) changes nothing."""
    if not isinstance(patch, Mapping):
        return current == patch
    if not isinstance(current, Mapping):
        return False
    for key, value in patch.items():
        if value is None:
            if current.get(key) is not None:
                return False
        elif not merged_is_same(current.get(key), value):
            return False
    return True


def status_unchanged(body: dict, status: dict) -> bool:
    """Whether a status merge patch would leave the object's status as it is (not worth a write)."""
    return merged_is_same(_status(body), status)


def series_phases(body: dict) -> tuple[str, tuple[str, ...]]:
    """(the series' phase, its tasks' phases) as the object says, for the metrics."""
    status = _status(body)
    tasks = tuple(str(task.get("phase") or TaskPhase.PENDING) for task in status.get("tasks") or ())
    return str(status.get("phase") or SeriesPhase.RECEIVING), tasks


def decision_status(state: SeriesState) -> dict:
    """The operator's status fields for `state` (a merge patch: the receiver's fields untouched)."""
    return {
        "phase": str(state.phase),
        "generation": state.generation,
        "lateSeen": to_rfc3339(state.arrivals_seen) if state.arrivals_seen else None,
        "lateInstances": state.late_instances,
        "instancesDeleted": state.cleaned,
        "completedTime": to_rfc3339(state.finished_at),
    }


def task_entry(task: TaskState, now: float) -> dict:
    """status.tasks[] for a new task; its Job is named after it. A study's share says which
    entry of the fingerprint's spec.study.series the series fills."""
    entry = {"taskId": task.task_id, "fingerprint": task.fingerprint, "generation": task.generation,
             "job": task.task_id, "phase": str(task.phase), "startTime": to_rfc3339(now)}
    if task.entry:
        entry["entry"] = task.entry
    return entry


def tasks_status(entries: list[dict]) -> dict:
    """status.tasks with the progress column that goes with it."""
    tasks = [TaskState(task_id=e["taskId"], fingerprint=e.get("fingerprint", ""),
                       generation=int(e.get("generation", 1)), phase=TaskPhase(e.get("phase") or "Pending"))
             for e in entries]
    return {"tasks": entries, "progress": progress(tasks)}


def _entries(body: dict) -> list[dict]:
    return [dict(entry) for entry in _status(body).get("tasks") or []]


def dispatch_status(body: dict, dispatched: SeriesState, new_tasks: list[TaskState], instances: int,
                    now: float) -> dict:
    """The decision to dispatch: the series' fields, and one Pending entry per new task."""
    entries = _entries(body) + [task_entry(task, now) for task in new_tasks]
    return {**decision_status(dispatched), "dispatchedInstances": instances, "dispatchedTime": to_rfc3339(now),
            **tasks_status(entries)}


def study_share_status(body: dict, step: StartStudy | FailStudy, now: float) -> dict | None:
    """status.tasks with this series' shares of a study decision changed (None: it has none):
    StartStudy makes them the study task, Pending; FailStudy fails them."""
    key = key_of(body)
    mine = {old for share_key, old in step.shares if share_key == key}
    entries = _entries(body)
    changed = False
    for entry in entries:
        if entry.get("taskId") not in mine or entry.get("phase") != TaskPhase.WAITING:
            continue
        changed = True
        if isinstance(step, StartStudy):
            entry.update(taskId=step.task_id, job=step.task_id, phase=str(TaskPhase.PENDING), startTime=to_rfc3339(now))
        else:
            entry.update(phase=str(TaskPhase.FAILED), message=step.message[:1000], completionTime=to_rfc3339(now))
    return tasks_status(entries) if changed else None


def failed_task_status(body: dict, task_id: str, message: str, now: float) -> dict:
    """status.tasks with task `task_id` Failed for `message`."""
    return failed_tasks_status(body, {task_id: message}, now)


def failed_tasks_status(body: dict, messages: Mapping[str, str], now: float) -> dict:
    """status.tasks with each task of `messages` (task id -> message) Failed for its message."""
    entries = _entries(body)
    for entry in entries:
        if entry["taskId"] in messages:
            entry.update(phase=str(TaskPhase.FAILED), message=messages[entry["taskId"]][:1000],
                         completionTime=to_rfc3339(now))
    return tasks_status(entries)


# --- DicomSeries: an administrator's requests (annotations), and the operator's answers ----------

REQUEST_ANNOTATIONS = {AdminAction.RETRY: ANNOTATION_RETRY, AdminAction.REMATCH: ANNOTATION_REMATCH,
                       AdminAction.CANCEL: ANNOTATION_CANCEL}
REQUEST_EVENTS = {(AdminAction.RETRY, True): EventReason.RETRIED, (AdminAction.RETRY, False): EventReason.RETRY_REFUSED,
                  (AdminAction.REMATCH, True): EventReason.REMATCHED,
                  (AdminAction.REMATCH, False): EventReason.REMATCH_REFUSED,
                  (AdminAction.CANCEL, True): EventReason.CANCELLED,
                  (AdminAction.CANCEL, False): EventReason.CANCEL_REFUSED}


MAX_REQUEST_VALUE = 256  # longer annotation values are answered under their digest


def _request_value(value: str) -> str:
    if len(value) <= MAX_REQUEST_VALUE:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def pending_request(body: dict) -> tuple[AdminAction, str] | None:
    """The first request annotation whose value the operator has not answered yet
    (status.requests.<action>.value is the last one it answered), with that value."""
    annotations = body["metadata"].get("annotations") or {}
    answered = _status(body).get("requests") or {}
    for action, annotation in REQUEST_ANNOTATIONS.items():
        value = annotations.get(annotation)
        if isinstance(value, str) and (answered.get(str(action)) or {}).get("value") != _request_value(value):
            return action, _request_value(value)
    return None


def request_status(action: AdminAction, value: str, accepted: bool, message: str, now: float) -> dict:
    """The operator's answer to one request annotation (a merge patch of status.requests)."""
    return {"requests": {str(action): {"value": value, "accepted": accepted, "message": message[:1000],
                                       "time": to_rfc3339(now)}}}


def finish_status(body: dict, finished: SeriesState, ok: bool, now: float) -> tuple[dict, str]:
    """The decision that the series finished (its Complete condition), and what to say about it:
    'every task succeeded', or each failed task's fingerprint and message."""
    status = _status(body)
    failed = [t for t in status.get("tasks") or [] if t.get("phase") == TaskPhase.FAILED]
    message = "every task succeeded" if ok else "; ".join(
        f"{t['fingerprint']}: {t.get('message', '')}" for t in failed)[:1000]
    conditions = set_condition(status.get("conditions"), condition(
        ConditionType.COMPLETE, True, Reason.TASKS_SUCCEEDED if ok else Reason.TASK_FAILED, message,
        body["metadata"].get("generation")), now)
    return {**decision_status(finished), "conditions": conditions}, message


@dataclass(frozen=True)
class TaskReport:
    """What a task's Job and its record say now (relay.lifecycle.task_phase_from_job decided the
    phase and message; `record` is the task record the Job writes, see relay.kube.job_contract)."""

    phase: TaskPhase
    message: str
    inference_uid: str | None = None
    errors: Mapping[str, int] | None = None  # the record's error counts (None: no record)


@dataclass(frozen=True)
class TaskChange:
    """A task entry that a report changes: the patch, and what the operator must say about it."""

    status: dict  # status.tasks and progress, with the entry updated
    entry: dict  # the entry after the change
    finished: bool  # the task has just reached Succeeded or Failed
    first_uid: bool  # the InferenceServer's uid is recorded for the first time
    new_errors: dict[str, int]  # errors reported since the last change (to count once)


def task_change(body: dict, task_id: str, report: TaskReport, now: float) -> TaskChange | None:
    """The entry of `task_id` updated from `report`; None when nothing changes (no such task,
    nothing new, or a stale report about a task that already finished)."""
    entries = _entries(body)
    entry = next((t for t in entries if t.get("taskId") == task_id), None)
    if entry is None:
        return None
    before = entry.get("phase")
    if not accept_task_phase(before, report.phase):
        return None  # a stale event must not revive or change a finished task
    update: dict = {"phase": str(report.phase)}
    if report.message or entry.get("message"):
        update["message"] = report.message[:1000]
    if report.inference_uid:
        update["inferenceTaskUID"] = report.inference_uid
    if report.phase in TERMINAL_TASK_PHASES and not entry.get("completionTime"):
        update["completionTime"] = to_rfc3339(now)
    counted = entry.get("errors") or {}
    new_errors = new_counts(counted, report.errors or {})
    if new_errors:
        update["errors"] = {**counted, **{kind: counted.get(kind, 0) + n for kind, n in new_errors.items()}}
    if all(entry.get(k) == v for k, v in update.items()):
        return None
    first_uid = "inferenceTaskUID" in update and not entry.get("inferenceTaskUID")
    entry.update(update)
    return TaskChange(status=tasks_status(entries), entry=entry, first_uid=first_uid, new_errors=new_errors,
                      finished=report.phase in TERMINAL_TASK_PHASES and before not in TERMINAL_TASK_PHASES)


def new_counts(counted: Mapping[str, int], reported: Mapping[str, int]) -> dict[str, int]:
    """How much each of `reported` grew beyond what was `counted` already (never negative: a
    record read before a newer one was counted reports less, not fewer)."""
    grown = {}
    for kind, value in reported.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        extra = value - int(counted.get(kind) or 0)
        if extra > 0:
            grown[kind] = extra
    return grown


# --- Fingerprints --------------------------------------------------------------------------------


def ready_status(body: dict, ready: dict, now: float) -> dict | None:
    """The Fingerprint's Ready condition and observedGeneration; None when both are as written."""
    status = _status(body)
    generation = body["metadata"].get("generation")
    conditions = set_condition(status.get("conditions"), ready, now)
    if same_conditions(conditions, status.get("conditions")) and status.get("observedGeneration") == generation:
        return None
    return {"conditions": conditions, "observedGeneration": generation}


def fingerprint_readiness(body: dict) -> tuple[bool | None, str]:
    """(Ready, its message) as the operator wrote them; (None, "") before it looked at it."""
    for item in _status(body).get("conditions") or []:
        if item.get("type") == ConditionType.READY:
            return item.get("status") == "True", str(item.get("message") or "")
    return None, ""


def counter_status(body: dict, counter: str, now: float, added: int = 1) -> dict:
    """`added` more on a Fingerprint's counter (matchedSeries also notes lastMatchTime)."""
    patch = {counter: int(_status(body).get(counter) or 0) + added}
    if counter == MATCHED_SERIES:
        patch["lastMatchTime"] = to_rfc3339(now)
    return patch


# --- other objects: Jobs, kopf's peering, Events --------------------------------------------------


def job_series(job: dict) -> str | None:
    """The name of the DicomSeries a Job runs a task of (its label)."""
    return (job["metadata"].get("labels") or {}).get(LABEL_SERIES)


def job_outcome(job: dict) -> tuple[JobOutcome, str]:
    """What a Job's conditions say, and their message. What that means for the task is
    relay.lifecycle.task_phase_from_job's to say."""
    for item in _status(job).get("conditions") or []:
        if item.get("status") != "True":
            continue
        if item.get("type") == "Complete":
            return JobOutcome.COMPLETE, item.get("message") or ""
        if item.get("type") == "Failed":
            reason = item.get("reason") or "Failed"
            return JobOutcome.FAILED, f"{reason}: {item.get('message') or ''}".strip(": ")
    return JobOutcome.RUNNING, ""


def peering_status(body: dict | None) -> dict | None:
    """The status of a KopfPeering ({} when empty), None when it does not exist."""
    return None if body is None else _status(body)


def event(body: dict, namespace: str, reason: str, message: str, *, warning: bool, component: str,
          host: str, now: float) -> dict:
    """A core/v1 Event about `body`."""
    stamp = to_rfc3339(now)
    meta = body["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body.get("kind"),
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": str(reason),
        "message": message[:1000],
        "type": "Warning" if warning else "Normal",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": None,
        "count": 1,
        "source": {"component": component, "host": host},
        "reportingComponent": component,
        "reportingInstance": host,
    }
