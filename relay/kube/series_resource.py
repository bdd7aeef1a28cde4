"""The DicomSeries custom resource <-> the core's plain SeriesState.

The receiver writes spec and the received counters; the operator drives phase and tasks. Both
translate through here, so that the life-cycle rules (relay.lifecycle) see the same SeriesState
in Kubernetes as in `isdr run`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import SeriesPhase, SeriesState, TaskPhase, TaskState, progress
from relay.uids import SeriesKey

GROUP = "isdr.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "dicomseries"
KIND = "DicomSeries"

# Labels that tie Jobs (and Events' objects) to their series and fingerprint.
LABEL_SERIES = "isdr.io/series"
LABEL_FINGERPRINT = "isdr.io/fingerprint"
LABEL_TASK = "isdr.io/task"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "isdr-operator"


def resource_name(key: SeriesKey) -> str:
    """`series-<digest>`: deterministic, a valid name and label value, no patient data."""
    return "series-" + hashlib.sha256(key.slug.encode()).hexdigest()[:40]


def to_rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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


def key_of(body: dict) -> SeriesKey:
    spec = body["spec"]
    return SeriesKey(spec["seriesInstanceUID"], spec["sopClassUID"])


def series_state(body: dict) -> SeriesState:
    """The core's view of a DicomSeries (the stored instances and the dispatch records are in
    storage: a driver adds them when the rules ask, see relay.lifecycle.ListStorage)."""
    spec, status = body["spec"], body.get("status") or {}
    key = key_of(body)
    tasks = tuple(
        TaskState(
            task_id=task["taskId"],
            fingerprint=task["fingerprint"],
            generation=int(task.get("generation", 1)),
            phase=TaskPhase(task.get("phase") or TaskPhase.PENDING),
            inference_uid=task.get("inferenceTaskUID"),
            message=task.get("message", ""),
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
    """status.tasks[] for a new task; its Job is named after it."""
    return {"taskId": task.task_id, "fingerprint": task.fingerprint, "generation": task.generation,
            "job": task.task_id, "phase": str(task.phase), "startTime": to_rfc3339(now)}


def tasks_status(entries: list[dict]) -> dict:
    """status.tasks with the progress column that goes with it."""
    tasks = [TaskState(task_id=e["taskId"], fingerprint=e.get("fingerprint", ""),
                       generation=int(e.get("generation", 1)), phase=TaskPhase(e.get("phase") or "Pending"))
             for e in entries]
    return {"tasks": entries, "progress": progress(tasks)}
