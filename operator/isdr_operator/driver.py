"""Carries out, on Kubernetes, what relay.lifecycle decides for each DicomSeries.

The same short loop as `isdr run`'s scheduler: read the DicomSeries, ask the rules for the next
step (listing the series' instances in storage when the rules need the facts), persist the
decision on the DicomSeries, carry it out (Jobs, Events, storage clean-up). Every status write
carries the resourceVersion it was computed from, so a decision made on a stale object is retried
on the fresh one instead of overwriting the receiver's newer counts.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace

from relay import metrics
from relay.fingerprints.matching import matching_fingerprints
from relay.kube.publisher import Conflict, NotFound
from relay.kube.series_resource import (
    LABEL_SERIES,
    LABEL_TASK,
    decision_status,
    from_rfc3339,
    series_state,
    task_entry,
    tasks_status,
    to_rfc3339,
)
from relay.lifecycle import (
    TERMINAL_TASK_PHASES,
    Cleanup,
    Dispatch,
    DropUnmatched,
    Finish,
    Forget,
    ListStorage,
    NoteArrivals,
    PendingTaskAction,
    Reopen,
    SeriesPhase,
    SeriesState,
    TaskPhase,
    Wait,
    accept_task_phase,
    apply_cleanup,
    apply_dispatch,
    apply_finish,
    apply_note_arrivals,
    apply_reopen,
    arrivals_note,
    forget_note,
    next_step,
    pending_task_action,
    possible_duplicate_note,
    task_phase_from_job,
    with_stored,
)
from relay.pipeline import work_folder
from relay.state_store import DispatchStore, TaskStore, read_task
from relay.storage.base import Storage
from relay.storage.instances import stored_instances

from isdr_operator.conditions import condition, set_condition
from isdr_operator.fingerprints import FingerprintSet
from isdr_operator.jobs import build_job, job_outcome
from isdr_operator.kube_api import OperatorApi
from isdr_operator.settings import OperatorSettings

log = logging.getLogger("isdr_operator.series")

TASK_CHECK_INTERVAL = 30.0  # a safety net: Job events normally drive a dispatched series
RETRY_AFTER_ERROR = 5.0
CONFLICT_ATTEMPTS = 5


class SeriesDriver:
    def __init__(self, api: OperatorApi, settings: OperatorSettings, storage: Storage,
                 fingerprints: FingerprintSet, clock=time.time):
        from relay.config import lifecycle_rules

        self.api = api
        self.settings = settings
        self.storage = storage
        self.dispatches = DispatchStore(storage)
        self.fingerprints = fingerprints
        self.rules = lifecycle_rules(settings.relay)
        self.clock = clock

    # --- one series: read, ask, persist, carry out ---

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
        if not (body.get("status") or {}).get("lastReceived"):
            return None  # just created; the receiver's status write (an event) brings it back
        state = series_state(body)
        if state.phase == SeriesPhase.DISPATCHED:
            self._ensure_jobs(body, state)
        step = next_step(state, self.fingerprints.ready(), now, self.rules, matching_fingerprints)
        if isinstance(step, ListStorage):
            state = with_stored(state, *stored_instances(self.storage, state.key))
            state = replace(state, dispatches=self.dispatches.load_all(state.key))
            step = next_step(state, self.fingerprints.ready(), now, self.rules, matching_fingerprints)
        if isinstance(step, Wait):
            if step.until is not None:
                return max(0.05, step.until - now)
            return TASK_CHECK_INTERVAL if state.active_tasks else None
        if isinstance(step, Dispatch):
            return self._dispatch(body, state, step, now)
        if isinstance(step, (Reopen, NoteArrivals)):
            return self._arrivals(body, state, step)
        if isinstance(step, DropUnmatched):
            return self._drop_unmatched(body, state, step)
        if isinstance(step, Finish):
            return self._finish(body, state, step, now)
        if isinstance(step, Cleanup):
            return self._cleanup(body, state, step)
        if isinstance(step, Forget):
            return self._forget(body, state, step)
        raise TypeError(f"unexpected step {step!r}")

    def _dispatch(self, body, state: SeriesState, step: Dispatch, now: float) -> float:
        # What is sent is recorded first (in storage: the Jobs read it there), then the decision
        # (guarded by resourceVersion), then the Jobs from the decision: a lost race or a crash
        # in between leaves at most Pending tasks whose Jobs the next step creates, never a Job
        # that no record knows of.
        dispatched = apply_dispatch(state, step, now)
        self.dispatches.save(state.key, dispatched.dispatches[-1])
        status = body.get("status") or {}
        new_tasks = [t for t in dispatched.tasks if t.generation == step.generation]
        entries = list(status.get("tasks") or []) + [task_entry(t, now) for t in new_tasks]
        body = self.api.patch_series_status(body, {
            **decision_status(dispatched),
            "dispatchedInstances": len(step.instances),
            "dispatchedTime": to_rfc3339(now),
            **tasks_status(entries),
        })
        self._ensure_jobs(body, series_state(body))
        waited = now - state.last_received
        message = (f"dispatch #{step.generation} matched {', '.join(step.fingerprints)}: Jobs "
                   f"{', '.join(t.task_id for t in new_tasks)} ({len(step.instances)} instances, quiet for "
                   f"{waited:.1f}s)")
        self.api.event(body, "Dispatched", message)
        log.info("series %s: %s", state.key.series_uid, message)
        for task in new_tasks:
            self._count_on_fingerprint(task.fingerprint, "matchedSeries", body, state, task.task_id)
        return TASK_CHECK_INTERVAL

    def _arrivals(self, body, state: SeriesState, step: Reopen | NoteArrivals) -> float:
        after = apply_reopen(state, step) if isinstance(step, Reopen) else apply_note_arrivals(state, step)
        self.api.patch_series_status(body, decision_status(after))
        note = arrivals_note(state, step, self.rules)
        late = isinstance(step, Reopen) or step.late_instances > state.late_instances
        self.api.event(body, "LateInstances" if late else "DuplicateInstances", note, warning=late)
        (log.warning if late else log.info)("series %s: %s", state.key.series_uid, note)
        return 0.05

    def _ensure_jobs(self, body: dict, state: SeriesState) -> None:
        """Create the Job of every Pending task (409 AlreadyExists: it is there, fine)."""
        name = body["metadata"]["name"]
        for task in state.tasks:
            if task.phase != TaskPhase.PENDING:
                continue
            fingerprint_body = self.fingerprints.body(task.fingerprint)
            action = pending_task_action(fingerprint_body is not None)
            if action == PendingTaskAction.ASK_FOR_JOB:
                action = pending_task_action(False, self.api.job_exists(task.task_id))
            if action == PendingTaskAction.FAIL:
                self._fail_task(body, task.task_id, f"fingerprint {task.fingerprint} was deleted "
                                "before its Job could be created")
                metrics.task_finished(task.task_id, task.fingerprint, TaskPhase.FAILED)
            if action != PendingTaskAction.CREATE_JOB:
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
                entry.update(phase=str(TaskPhase.FAILED), message=message,
                             completionTime=to_rfc3339(self.clock()))
        self.api.patch_series_status(body, tasks_status(tasks))
        self.api.event(body, "TaskFailed", f"{task_id}: {message}", warning=True)

    def _drop_unmatched(self, body, state: SeriesState, step: DropUnmatched) -> None:
        message = (f"no Ready Fingerprint matches (modality {state.attributes.modality or '-'}, "
                   f"SOP class {state.key.sop_class_uid}): instances deleted")
        self.api.event(body, "Unmatched", message)
        # The object first, guarded by its resourceVersion: an instance published meanwhile makes
        # this a Conflict and the series is looked at again instead of being dropped.
        self.api.delete_series(body)
        self.storage.delete([state.key.instance_key(uid) for uid in step.instances])
        log.info("series %s: %s (%d)", state.key.series_uid, message, len(step.instances))
        return None

    def _finish(self, body, state: SeriesState, step: Finish, now: float) -> float:
        status = body.get("status") or {}
        ok = step.phase == SeriesPhase.SUCCEEDED
        failed = [t for t in status.get("tasks") or [] if t.get("phase") == TaskPhase.FAILED]
        message = "every task succeeded" if ok else "; ".join(
            f"{t['fingerprint']}: {t.get('message', '')}" for t in failed)[:1000]
        conditions = set_condition(status.get("conditions"), condition(
            "Complete", True, "TasksSucceeded" if ok else "TaskFailed", message,
            body["metadata"].get("generation")), now)
        self.api.patch_series_status(body, {**decision_status(apply_finish(state, step, now)),
                                            "conditions": conditions})
        self.api.event(body, str(step.phase), message, warning=not ok)
        log.info("series %s %s: %s", state.key.series_uid, step.phase.lower(), message)
        return 0.05

    def _cleanup(self, body, state: SeriesState, step: Cleanup) -> float | None:
        if step.delete:
            # Dispatched instances of finished tasks only: a late one that re-opens it stays.
            self.storage.delete([state.key.instance_key(uid) for uid in step.delete])
            log.info("series %s: deleted its %d instances (DELETE_ON_POST)", state.key.series_uid,
                     len(step.delete))
        self._remove_work_folders(state)
        self.api.patch_series_status(body, decision_status(apply_cleanup(state, step)))
        return 0.05

    def _forget(self, body, state: SeriesState, step: Forget) -> None:
        if step.delete:
            self.storage.delete([state.key.instance_key(uid) for uid in step.delete])
            note = forget_note(step)
            self.api.event(body, "LateInstancesDeleted", note, warning=True)
            log.warning("series %s: %s", state.key.series_uid, note)
        for task in state.tasks:
            TaskStore(self.storage, task.task_id).delete()
        self.dispatches.delete_all(state.key)
        self._remove_work_folders(state)
        self.api.delete_series(body)
        finished = f" (finished {self.clock() - state.finished_at:.0f}s ago)" if state.finished_at else ""
        log.info("series %s forgotten%s", state.key.series_uid, finished)
        return None

    def _remove_work_folders(self, state: SeriesState) -> None:
        """What a killed Job pod left in the shared work folder (local storage only)."""
        for task in state.tasks:
            folder = work_folder(self.settings.relay.task_work_root, task.task_id)
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

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
        phase, message = task_phase_from_job(outcome, job_message, record)
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
            if not accept_task_phase(before, phase):
                return series_name  # a stale event must not revive or change a finished task
            update = {"phase": str(phase), "message": message[:1000]}
            if record and record.inference_uid:
                update["inferenceTaskUID"] = record.inference_uid
            if phase in TERMINAL_TASK_PHASES and not entry.get("completionTime"):
                update["completionTime"] = to_rfc3339(self.clock())
            if all(entry.get(k) == v for k, v in update.items()):
                return series_name
            first_uid = "inferenceTaskUID" in update and not entry.get("inferenceTaskUID")
            entry.update(update)
            try:
                self.api.patch_series_status(body, tasks_status(tasks))
            except Conflict:
                continue
            if first_uid and record.unknown_submits:
                # The Job's pod counted its repeat too, but nobody scrapes it: the operator does.
                metrics.possible_duplicate_submit()
                self.api.event(body, "PossibleDuplicateSubmit", f"Job {entry['job']}: {possible_duplicate_note(record)}",
                               warning=True)
            if phase in TERMINAL_TASK_PHASES and before not in TERMINAL_TASK_PHASES:
                self._task_finished(body, entry, series_state(body))
            return series_name
        return series_name

    def _task_finished(self, body: dict, entry: dict, state) -> None:
        ok = entry["phase"] == TaskPhase.SUCCEEDED
        metrics.task_finished(entry["taskId"], entry["fingerprint"], entry["phase"],
                              from_rfc3339(entry.get("startTime")), from_rfc3339(entry.get("completionTime")))
        where = f"Job {entry['job']} ({entry['fingerprint']})"
        if ok:
            self.api.event(body, "TaskSucceeded", f"{where}: predictions delivered")
        else:
            self.api.event(body, "TaskFailed", f"{where}: {entry.get('message') or 'failed'}", warning=True)
        self._count_on_fingerprint(entry["fingerprint"], "succeededTasks" if ok else "failedTasks",
                                   body, state, entry["job"])
