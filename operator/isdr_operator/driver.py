"""Carries out, on Kubernetes, what relay.lifecycle decides for each DicomSeries.

The rules are the core's; this module only reads the resources, asks the rules, and writes the
outcome back: Jobs, status, Events, storage clean-up. Every status write carries the
resourceVersion it was computed from, so a decision made on a stale object is retried on the
fresh one instead of overwriting the receiver's newer counts.
"""

from __future__ import annotations

import logging
import time

from relay import metrics
from relay.fingerprints.matching import matching_fingerprints
from relay.kube.publisher import Conflict, NotFound
from relay.kube.series_resource import LABEL_SERIES, LABEL_TASK, from_rfc3339, series_state, to_rfc3339
from relay.kube.task_store import TaskStore, read_task
from relay.lifecycle import (
    DISPATCHED,
    RECEIVING,
    SUCCEEDED,
    TASK_FAILED,
    TASK_PENDING,
    TASK_SUCCEEDED,
    TERMINAL_TASK_PHASES,
    Cleanup,
    Dispatch,
    DropUnmatched,
    Finish,
    Wait,
    apply_dispatch,
    can_forget,
    next_step,
    on_late_instances,
)
from relay.storage.base import Storage

from isdr_operator.conditions import condition, set_condition
from isdr_operator.fingerprints import FingerprintSet
from isdr_operator.jobs import build_job, job_outcome
from isdr_operator.kube_api import OperatorApi
from isdr_operator.settings import OperatorSettings

log = logging.getLogger("isdr_operator.series")

TASK_CHECK_INTERVAL = 30.0  # a safety net: Job events normally drive a dispatched series
RETRY_AFTER_ERROR = 5.0
CONFLICT_ATTEMPTS = 5


def task_entry(task, job_name: str, now: float) -> dict:
    return {"taskId": task.task_id, "fingerprint": task.fingerprint, "generation": task.generation,
            "job": job_name, "phase": task.phase, "startTime": to_rfc3339(now)}


def progress(tasks: list[dict]) -> str:
    """'<succeeded>/<total>' of the latest dispatch, for the Tasks printer column."""
    if not tasks:
        return ""
    latest = max(t.get("generation", 1) for t in tasks)
    current = [t for t in tasks if t.get("generation", 1) == latest]
    return f"{sum(t.get('phase') == TASK_SUCCEEDED for t in current)}/{len(current)}"


def late_arrivals(status: dict) -> int:
    """How many instances arrived since the dispatch and were not noticed yet (0: none).

    Told by time, not by counting: after a clean-up the stored count starts again from the late
    ones, and a re-sent instance does not change it at all."""
    last = from_rfc3339(status.get("lastReceived"))
    seen = max(filter(None, (from_rfc3339(status.get("dispatchedTime")),
                             from_rfc3339(status.get("lateSeen")))), default=None)
    if last is None or seen is None or last <= seen:
        return 0
    stored = int(status.get("instances") or 0)
    if not status.get("instancesDeleted"):
        stored -= int(status.get("dispatchedInstances") or 0) + int(status.get("lateInstances") or 0)
    return max(1, stored)


class SeriesDriver:
    def __init__(self, api: OperatorApi, settings: OperatorSettings, storage: Storage,
                 fingerprints: FingerprintSet, clock=time.time):
        from relay.config import lifecycle_rules

        self.api = api
        self.settings = settings
        self.storage = storage
        self.fingerprints = fingerprints
        self.rules = lifecycle_rules(settings.relay)
        self.clock = clock

    # --- one series ---

    def step(self, name: str) -> float | None:
        """Take the next step for DicomSeries `name`; returns seconds until it needs another look
        (None: nothing more to do until something changes, e.g. the object is gone)."""
        for _ in range(CONFLICT_ATTEMPTS):
            body = self.api.get_series(name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            try:
                return self._step(body)
            except Conflict:
                continue  # the receiver (or a Job event) changed it meanwhile: decide again
        return RETRY_AFTER_ERROR

    def _step(self, body: dict) -> float | None:
        now = self.clock()
        status = body.get("status") or {}
        if not status.get("lastReceived"):
            return None  # just created; the receiver's status write (an event) brings it back
        state = series_state(body)
        late = late_arrivals(status) if state.phase != RECEIVING else 0
        if late:
            return self._late(body, state, late, now)
        if state.phase == DISPATCHED:
            self._ensure_jobs(body, state)
        step = next_step(state, self.fingerprints.ready(), now, self.rules, matching_fingerprints)
        if isinstance(step, Dispatch):
            return self._dispatch(body, state, step, now)
        if isinstance(step, DropUnmatched):
            return self._drop_unmatched(body, state)
        if isinstance(step, Finish):
            return self._finish(body, state, step, now)
        if isinstance(step, Cleanup):
            return self._cleanup(body, state, step)
        if isinstance(step, Wait) and step.until is not None:
            return max(0.05, step.until - now)
        if can_forget(state, now, self.rules):
            self.api.delete_series(body)
            log.info("series %s forgotten (finished %.0fs ago)", state.key.series_uid, now - state.finished_at)
            return None
        if state.phase == SUCCEEDED and state.cleaned and state.finished_at is not None:
            return max(1.0, state.finished_at + self.rules.forget_after - now)
        return TASK_CHECK_INTERVAL if state.active_tasks else None

    def _late(self, body, state, count: int, now: float) -> float:
        state, note = on_late_instances(state, count, now, self.rules)
        patch = {"lateInstances": state.late_instances, "phase": state.phase,
                 "instancesDeleted": state.cleaned, "lateSeen": (body.get("status") or {}).get("lastReceived")}
        if state.phase == RECEIVING:
            # Re-opened: the next dispatch counts from everything stored now.
            patch["dispatchedInstances"] = int((body.get("status") or {}).get("instances") or 0)
            patch["lateInstances"] = 0
            patch["completedTime"] = None
        self.api.patch_series_status(body, patch)
        self.api.event(body, "LateInstances", note, warning=True)
        log.warning("series %s: %s", state.key.series_uid, note)
        return 0.05

    def _dispatch(self, body, state, step: Dispatch, now: float) -> float:
        # The decision is recorded first (guarded by resourceVersion), the Jobs created from the
        # record: a lost race or a crash in between leaves Pending tasks whose Jobs the next step
        # creates, never a Job that no record knows of.
        status = body.get("status") or {}
        dispatched = apply_dispatch(state, step, (), now)
        new_tasks = [t for t in dispatched.tasks if t.generation == step.generation]
        entries = list(status.get("tasks") or []) + [task_entry(t, t.task_id, now) for t in new_tasks]
        body = self.api.patch_series_status(body, {
            "phase": dispatched.phase,
            "generation": step.generation,
            "dispatchedInstances": int(status.get("instances") or 0),
            "dispatchedTime": to_rfc3339(now),
            "completedTime": None,
            "instancesDeleted": False,
            "tasks": entries,
            "progress": progress(entries),
        })
        self._ensure_jobs(body, series_state(body))
        waited = now - state.last_received
        message = (f"matched {', '.join(step.fingerprints)}: Jobs {', '.join(t.task_id for t in new_tasks)} "
                   f"({int(status.get('instances') or 0)} instances, quiet for {waited:.1f}s)")
        self.api.event(body, "Dispatched", message)
        log.info("series %s: %s", state.key.series_uid, message)
        for task in new_tasks:
            self._count_on_fingerprint(task.fingerprint, "matchedSeries", body, state, task.task_id)
        return TASK_CHECK_INTERVAL

    def _ensure_jobs(self, body: dict, state) -> None:
        """Create the Job of every Pending task (409 AlreadyExists: it is there, fine)."""
        name = body["metadata"]["name"]
        for task in state.tasks:
            if task.phase != TASK_PENDING:
                continue
            fingerprint_body = self.fingerprints.body(task.fingerprint)
            if fingerprint_body is None:
                self._fail_task(body, task.task_id, f"fingerprint {task.fingerprint} was deleted "
                                "before its Job could be created")
                metrics.task_finished(task.task_id, task.fingerprint, TASK_FAILED)
                continue
            job = build_job(task=task, key=state.key, series_name=name, fingerprint_body=fingerprint_body,
                            settings=self.settings.jobs, relay_get_timeout=self.settings.relay.get_timeout)
            if self.api.create_job(job):
                log.info("series %s: created Job %s", state.key.series_uid, task.task_id)
                metrics.task_started(task.task_id, task.fingerprint)

    def _fail_task(self, body: dict, task_id: str, message: str) -> None:
        tasks = [dict(t) for t in (body.get("status") or {}).get("tasks") or []]
        for entry in tasks:
            if entry["taskId"] == task_id:
                entry.update(phase=TASK_FAILED, message=message, completionTime=to_rfc3339(self.clock()))
        self.api.patch_series_status(body, {"tasks": tasks, "progress": progress(tasks)})
        self.api.event(body, "TaskFailed", f"{task_id}: {message}", warning=True)

    def _drop_unmatched(self, body, state) -> None:
        message = (f"no Ready Fingerprint matches (modality {state.attributes.modality or '-'}, "
                   f"SOP class {state.key.sop_class_uid}): instances deleted")
        self.api.event(body, "Unmatched", message)
        # The object first, guarded by its resourceVersion: an instance published meanwhile makes
        # this a Conflict and the series is looked at again instead of being dropped.
        self.api.delete_series(body)
        removed = self.storage.delete_prefix(state.key.prefix)
        log.info("series %s: %s (%d)", state.key.series_uid, message, removed)
        return None

    def _finish(self, body, state, step: Finish, now: float) -> float:
        status = body.get("status") or {}
        ok = step.phase == SUCCEEDED
        failed = [t for t in status.get("tasks") or [] if t.get("phase") == TASK_FAILED]
        message = "every task succeeded" if ok else "; ".join(
            f"{t['fingerprint']}: {t.get('message', '')}" for t in failed)[:1000]
        conditions = set_condition(status.get("conditions"), condition(
            "Complete", True, "TasksSucceeded" if ok else "TaskFailed", message,
            body["metadata"].get("generation")), now)
        self.api.patch_series_status(body, {"phase": step.phase, "completedTime": to_rfc3339(now),
                                            "conditions": conditions})
        self.api.event(body, step.phase, message, warning=not ok)
        log.info("series %s %s: %s", state.key.series_uid, step.phase.lower(), message)
        return 0.05

    def _cleanup(self, body, state, step: Cleanup) -> float | None:
        if step.delete_instances:
            removed = self.storage.delete_prefix(state.key.prefix)
            for task in state.tasks:
                TaskStore(self.storage, task.task_id).delete()
            log.info("series %s: deleted its %d instances (DELETE_ON_POST)", state.key.series_uid, removed)
        self.api.patch_series_status(body, {"instancesDeleted": True})
        return 0.05

    def _count_on_fingerprint(self, fingerprint: str, counter: str, series_body: dict, state,
                              task_id: str) -> None:
        """Add one to a Fingerprint's status counter (a deleted Fingerprint is no error)."""
        for _ in range(CONFLICT_ATTEMPTS):
            body = self.api.get_fingerprint(fingerprint)
            if body is None:
                return
            status = body.get("status") or {}
            patch = {counter: int(status.get(counter) or 0) + 1}
            if counter == "matchedSeries":
                patch["lastMatchTime"] = to_rfc3339(self.clock())
            try:
                self.api.patch_fingerprint_status(body, patch)
            except Conflict:
                continue
            except NotFound:
                return
            if counter == "matchedSeries":
                self.api.event(body, "Matched", f"series {state.key.series_uid} "
                               f"({state.attributes.modality or '-'}) -> Job {task_id}")
            elif counter == "failedTasks":
                self.api.event(body, "TaskFailed", f"Job {task_id} failed", warning=True)
            return

    # --- Jobs ---

    def job_changed(self, job: dict) -> str | None:
        """Copy a Job's progress into its DicomSeries; returns the series' name to look at again."""
        labels = job["metadata"].get("labels") or {}
        series_name, task_id = labels.get(LABEL_SERIES), labels.get(LABEL_TASK)
        if not series_name or not task_id:
            return None
        outcome, job_message = job_outcome(job)
        record = read_task(self.storage, task_id)
        phase = outcome or (record.phase if record else "Pending")
        message = (record.message if record and record.message else "") or job_message
        if outcome == TASK_FAILED and job_message and job_message not in message:
            message = f"{message} ({job_message})" if message else job_message
        for _ in range(CONFLICT_ATTEMPTS):
            body = self.api.get_series(series_name)
            if body is None:
                return None
            status = body.get("status") or {}
            tasks = [dict(t) for t in status.get("tasks") or []]
            entry = next((t for t in tasks if t.get("taskId") == task_id), None)
            if entry is None:
                return series_name
            before = entry.get("phase")
            update = {"phase": phase, "message": message[:1000]}
            if record and record.inference_uid:
                update["inferenceTaskUID"] = record.inference_uid
            if phase in TERMINAL_TASK_PHASES and not entry.get("completionTime"):
                update["completionTime"] = to_rfc3339(self.clock())
            if all(entry.get(k) == v for k, v in update.items()):
                return series_name
            if before in TERMINAL_TASK_PHASES and phase not in TERMINAL_TASK_PHASES:
                return series_name  # a stale event must not revive a finished task
            entry.update(update)
            try:
                self.api.patch_series_status(body, {"tasks": tasks, "progress": progress(tasks)})
            except Conflict:
                continue
            if phase in TERMINAL_TASK_PHASES and before not in TERMINAL_TASK_PHASES:
                self._task_finished(body, entry, series_state(body))
            return series_name
        return series_name

    def _task_finished(self, body: dict, entry: dict, state) -> None:
        ok = entry["phase"] == TASK_SUCCEEDED
        metrics.task_finished(entry["taskId"], entry["fingerprint"], entry["phase"],
                              from_rfc3339(entry.get("startTime")), from_rfc3339(entry.get("completionTime")))
        where = f"Job {entry['job']} ({entry['fingerprint']})"
        if ok:
            self.api.event(body, "TaskSucceeded", f"{where}: predictions delivered")
        else:
            self.api.event(body, "TaskFailed", f"{where}: {entry.get('message') or 'failed'}", warning=True)
        self._count_on_fingerprint(entry["fingerprint"], "succeededTasks" if ok else "failedTasks",
                                   body, state, entry["job"])
