"""Carries out, on Kubernetes, what relay.lifecycle decides for each DicomSeries.

The same short loop as `isdr run`'s scheduler: read the DicomSeries, ask the rules for the next
step (listing the series' instances in storage when the rules need the facts), persist the
decision on the DicomSeries, carry it out (Jobs, Events, storage clean-up). Every status write
carries the resourceVersion it was computed from, so a decision made on a stale object is retried
on the fresh one instead of overwriting the receiver's newer counts.

No write the operator can know is useless: a status patch that changes nothing is not sent, and
a Job is created only for a Pending task whose Job the operator has not seen (its own creates and
the Job watch tell it which exist). Watch events are triaged from the watched object alone
(`triage`): a series whose next step is to wait costs no API call at all.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import replace

from relay import metrics
from relay.fingerprints.matching import matching_fingerprints
from relay.kube.api import CONFLICT_ATTEMPTS, Conflict, KubeApi
from relay.kube.resources import (
    FAILED_TASKS,
    LABEL_SERIES,
    LABEL_STUDY,
    LABEL_TASK,
    MATCHED_SERIES,
    REQUEST_EVENTS,
    SUCCEEDED_TASKS,
    EventReason,
    TaskReport,
    decision_status,
    dispatch_status,
    failed_task_status,
    failed_tasks_status,
    finish_status,
    from_rfc3339,
    has_received,
    job_outcome,
    pending_request,
    request_status,
    series_state,
    status_unchanged,
    task_change,
)
from relay.lifecycle import (
    AdminAction,
    CancelTasks,
    Cleanup,
    Dispatch,
    DropUnmatched,
    Finish,
    Forget,
    JobOutcome,
    KeepUnmatched,
    ListStorage,
    NoteArrivals,
    PendingTaskAction,
    Reopen,
    SeriesPhase,
    SeriesState,
    TaskPhase,
    TaskState,
    Wait,
    apply_cancel,
    apply_cleanup,
    apply_dispatch,
    apply_finish,
    apply_keep_unmatched,
    apply_note_arrivals,
    apply_reopen,
    arrivals_note,
    cancel_decision,
    forget_note,
    next_step,
    pending_task_action,
    possible_duplicate_note,
    study_shares_note,
    rematch_decision,
    retry_decision,
    request_note,
    task_phase_from_job,
    unmatched_note,
    with_stored,
)
from relay.pipeline import work_folder
from relay.state_store import DispatchStore, StudyStore, TaskStore, read_task
from relay.storage.base import Storage
from relay.storage.instances import stored_instances

from isdr_operator.cancel import cancel_task
from isdr_operator.fingerprints import FingerprintSet
from isdr_operator.jobs import build_job
from isdr_operator.latest import LatestSeries
from isdr_operator.notices import Notices
from isdr_operator.settings import OperatorSettings
from isdr_operator.studies import SOON, StudyDriver

log = logging.getLogger("isdr_operator.series")

TASK_CHECK_INTERVAL = 30.0  # a safety net: Job events normally drive a dispatched series
RETRY_AFTER_ERROR = 5.0


class SeriesDriver:
    def __init__(self, api: KubeApi, settings: OperatorSettings, storage: Storage,
                 fingerprints: FingerprintSet, clock=time.time, notices: Notices | None = None):
        from relay.config import lifecycle_rules

        self.api = api
        self.settings = settings
        self.storage = storage
        self.dispatches = DispatchStore(storage)
        self.fingerprints = fingerprints
        self.rules = lifecycle_rules(settings.relay)
        self.clock = clock
        # Events and the Fingerprints' counters, written on the side (a step does not wait for them).
        self.notices = notices or Notices(api, clock)
        self.studies = StudyDriver(api, storage, fingerprints, clock, self.notices)
        self._studies_lock = threading.Lock()
        # The newest version of each series that waits for a step, as the watch brought it.
        self.latest = LatestSeries()
        # Jobs known to exist (created here, or seen by the Job watch or a listing): never
        # created again. Names only: the watch, not this set, holds what they say.
        self.jobs_seen: set[str] = set()
        # Jobs whose final outcome is already in their series' status: their events are old news.
        self.jobs_copied: set[str] = set()
        # What the series of each running Job was last told (a Job event that changes nothing
        # for the task, say its pod started, reads nothing from the API).
        self.job_reports: dict[str, TaskReport] = {}

    # --- a watch event: does the series need a step, and when? ---

    def triage(self, body: dict) -> float | None:
        """When the series `body` (as the watch shows it) needs a step: 0.0 now, else in that many
        seconds, None not until it changes. The same first decision `_step` would take on it, but
        without reading anything: an old, finished series costs nothing."""
        if body["metadata"].get("deletionTimestamp") or not has_received(body):
            return None
        if pending_request(body) is not None:
            return 0.0  # an administrator's retry, cancel or rematch: fresh work, whatever the phase
        state = series_state(body)
        if state.phase == SeriesPhase.DISPATCHED and self._jobs_to_create(state):
            return 0.0
        step = next_step(state, self.fingerprints.ready(), self.clock(), self.rules, matching_fingerprints)
        if isinstance(step, Wait):
            return self._waiting(state, step, self.clock())
        return 0.0

    def _waiting(self, state: SeriesState, step: Wait, now: float) -> float | None:
        if step.until is not None:
            return max(0.05, step.until - now)
        return TASK_CHECK_INTERVAL if state.active_tasks else None

    # --- one series: read, ask, persist, carry out ---

    def step(self, name: str) -> float | None:
        """Take the next step for DicomSeries `name`; returns seconds until it needs another look
        (None: nothing more to do until something changes, e.g. the object is gone)."""
        for attempt in range(CONFLICT_ATTEMPTS):
            # First from the version the watch brought; after a Conflict, from a fresh read.
            body = self.latest.get(name) if attempt == 0 else None
            if body is None:
                body = self._read(name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            try:
                return self._step(body)
            except Conflict:
                continue  # the receiver (or a Job event) changed it meanwhile: decide again
        return RETRY_AFTER_ERROR

    def _read(self, name: str) -> dict | None:
        body = self.api.get_series(name)
        if body is None:
            self.latest.drop(name)
        else:
            self.latest.refresh(body)
        return body

    def _step(self, body: dict) -> float | None:
        now = self.clock()
        if not has_received(body):
            return None  # just created; the receiver's status write (an event) brings it back
        state = series_state(body)
        request = pending_request(body)
        if request is not None:
            return self._request(body, state, *request, now)
        study_wait = None
        if state.attributes.study_uid and any(task.phase == TaskPhase.WAITING for task in state.tasks):
            with self._studies_lock:  # one study decision at a time (the scheduler has several workers)
                study_wait = self.studies.step(state.attributes.study_uid)
            if study_wait is not None and study_wait <= SOON:
                return study_wait  # the study's series changed: this one too, maybe
        if state.phase == SeriesPhase.DISPATCHED:
            self._ensure_jobs(body, state)
        delay = self._series_step(body, state, now)
        if study_wait is None:
            return delay
        return study_wait if delay is None else min(delay, study_wait)

    def _series_step(self, body: dict, state: SeriesState, now: float) -> float | None:
        step = next_step(state, self.fingerprints.ready(), now, self.rules, matching_fingerprints)
        if isinstance(step, ListStorage):
            state = with_stored(state, *stored_instances(self.storage, state.key))
            state = replace(state, dispatches=self.dispatches.load_all(state.key))
            step = next_step(state, self.fingerprints.ready(), now, self.rules, matching_fingerprints)
        if isinstance(step, Wait):
            return self._waiting(state, step, now)
        if isinstance(step, Dispatch):
            return self._dispatch(body, state, step, now)
        if isinstance(step, (Reopen, NoteArrivals)):
            return self._arrivals(body, state, step)
        if isinstance(step, DropUnmatched):
            return self._drop_unmatched(body, state, step)
        if isinstance(step, KeepUnmatched):
            return self._keep_unmatched(body, state, step, now)
        if isinstance(step, Finish):
            return self._finish(body, state, step, now)
        if isinstance(step, Cleanup):
            return self._cleanup(body, state, step)
        if isinstance(step, Forget):
            return self._forget(body, state, step)
        raise TypeError(f"unexpected step {step!r}")

    def _dispatch(self, body, state: SeriesState, step: Dispatch, now: float, answer: dict | None = None) -> float:
        # What is sent is recorded first (in storage: the Jobs read it there), then the decision
        # (guarded by resourceVersion), then the Jobs from the decision: a lost race or a crash
        # in between leaves at most Pending tasks whose Jobs the next step creates, never a Job
        # that no record knows of. `answer`: the answer to a retry request, written with it.
        dispatched = apply_dispatch(state, step, now)
        self.dispatches.save(state.key, dispatched.dispatches[-1])
        new_tasks = [t for t in dispatched.tasks if t.generation == step.generation]
        body = self._write(body, {**dispatch_status(body, dispatched, new_tasks, len(step.instances), now),
                                  **(answer or {})})
        self._ensure_jobs(body, series_state(body))
        waited = now - state.last_received
        jobs = [t.task_id for t in new_tasks if t.phase != TaskPhase.WAITING]
        message = (f"dispatch #{step.generation} matched {', '.join(step.fingerprints)}: Jobs "
                   f"{', '.join(jobs) or 'none yet'} ({len(step.instances)} instances, quiet for "
                   f"{waited:.1f}s){study_shares_note(step)}")
        self.notices.event(body, EventReason.DISPATCHED, message)
        log.info("series %s: %s", state.key.series_uid, message)
        for task in new_tasks:
            self._count_on_fingerprint(task.fingerprint, MATCHED_SERIES, state, task.task_id)
        return TASK_CHECK_INTERVAL

    def _arrivals(self, body, state: SeriesState, step: Reopen | NoteArrivals) -> float:
        after = apply_reopen(state, step) if isinstance(step, Reopen) else apply_note_arrivals(state, step)
        self._write(body, decision_status(after))
        note = arrivals_note(state, step, self.rules)
        late = isinstance(step, Reopen) or step.late_instances > state.late_instances
        self.notices.event(body, EventReason.LATE_INSTANCES if late else EventReason.DUPLICATE_INSTANCES, note,
                       warning=late)
        (log.warning if late else log.info)("series %s: %s", state.key.series_uid, note)
        return 0.05

    def _jobs_to_create(self, state: SeriesState) -> list:
        """The Pending tasks whose Job this operator has not seen."""
        return [task for task in state.tasks if task.phase == TaskPhase.PENDING and task.task_id not in self.jobs_seen]

    def _ensure_jobs(self, body: dict, state: SeriesState) -> None:
        """Create the Job of every Pending task not known to have one (409 AlreadyExists: it is
        there, fine; the next look knows it)."""
        name = body["metadata"]["name"]
        for task in self._jobs_to_create(state):
            fingerprint_body = self.fingerprints.body(task.fingerprint)
            action = pending_task_action(fingerprint_body is not None)
            if action == PendingTaskAction.ASK_FOR_JOB:
                exists = self.api.job_exists(task.task_id)
                if exists:
                    self.jobs_seen.add(task.task_id)
                action = pending_task_action(False, exists)
            if action == PendingTaskAction.FAIL:
                self._fail_task(body, task.task_id, f"fingerprint {task.fingerprint} was deleted "
                                "before its Job could be created")
                metrics.task_finished(task.task_id, task.fingerprint, TaskPhase.FAILED)
            if action != PendingTaskAction.CREATE_JOB:
                continue
            job = build_job(task=task, key=state.key, series_name=name, fingerprint_body=fingerprint_body,
                            settings=self.settings.jobs, relay_get_timeout=self.settings.relay.get_timeout,
                            study_uid=state.attributes.study_uid)
            created = self.api.create_job(job)
            self.jobs_seen.add(task.task_id)
            if created:
                log.info("series %s: created Job %s", state.key.series_uid, task.task_id)
                metrics.task_started(task.task_id, task.fingerprint)

    def _fail_task(self, body: dict, task_id: str, message: str) -> None:
        self._write(body, failed_task_status(body, task_id, message, self.clock()))
        self.notices.event(body, EventReason.TASK_FAILED, f"{task_id}: {message}", warning=True)

    def _drop_unmatched(self, body, state: SeriesState, step: DropUnmatched) -> None:
        message = (f"no Ready Fingerprint matches (modality {state.attributes.modality or '-'}, "
                   f"SOP class {state.key.sop_class_uid}): instances deleted")
        self.notices.event(body, EventReason.UNMATCHED, message)
        # The object first, guarded by its resourceVersion: an instance published meanwhile makes
        # this a Conflict and the series is looked at again instead of being dropped.
        self._delete(body)
        self.storage.delete([state.key.instance_key(uid) for uid in step.instances])
        log.info("series %s: %s (%d)", state.key.series_uid, message, len(step.instances))
        return None

    def _keep_unmatched(self, body, state: SeriesState, step: KeepUnmatched, now: float) -> float:
        self._write(body, decision_status(apply_keep_unmatched(state, step, now)))
        message = (f"modality {state.attributes.modality or '-'}, SOP class {state.key.sop_class_uid}: "
                   f"{unmatched_note(step, now)}")
        self.notices.event(body, EventReason.UNMATCHED, message)
        log.info("series %s: %s", state.key.series_uid, message)
        return max(0.05, step.until - now)

    def _finish(self, body, state: SeriesState, step: Finish, now: float) -> float:
        ok = step.phase == SeriesPhase.SUCCEEDED
        status, message = finish_status(body, apply_finish(state, step, now), ok, now)
        self._write(body, status)
        self.notices.event(body, EventReason.SUCCEEDED if ok else EventReason.FAILED, message, warning=not ok)
        log.info("series %s %s: %s", state.key.series_uid, step.phase.lower(), message)
        return 0.05

    def _cleanup(self, body, state: SeriesState, step: Cleanup) -> float | None:
        if step.delete:
            # Dispatched instances of finished tasks only: a late one that re-opens it stays.
            self.storage.delete([state.key.instance_key(uid) for uid in step.delete])
            log.info("series %s: deleted its %d instances (DELETE_ON_POST)", state.key.series_uid,
                     len(step.delete))
        self._remove_work_folders(state)
        self._write(body, decision_status(apply_cleanup(state, step)))
        return 0.05

    def _forget(self, body, state: SeriesState, step: Forget) -> None:
        if step.delete:
            self.storage.delete([state.key.instance_key(uid) for uid in step.delete])
            note = forget_note(step)
            self.notices.event(body, EventReason.LATE_INSTANCES_DELETED, note, warning=True)
            log.warning("series %s: %s", state.key.series_uid, note)
        for task in state.tasks:
            TaskStore(self.storage, task.task_id).delete()
            if task.entry:
                StudyStore(self.storage).delete(task.task_id)
        self.dispatches.delete_all(state.key)
        self._remove_work_folders(state)
        self._delete(body)
        finished = f" (finished {self.clock() - state.finished_at:.0f}s ago)" if state.finished_at else ""
        log.info("series %s forgotten%s", state.key.series_uid, finished)
        return None

    def _remove_work_folders(self, state: SeriesState) -> None:
        """What a killed Job pod left in the shared work folder (local storage only)."""
        for task in state.tasks:
            folder = work_folder(self.settings.relay.task_work_root, task.task_id)
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    def _count_on_fingerprint(self, fingerprint: str, counter: str, state: SeriesState, task_id: str) -> None:
        """One more on a Fingerprint's status counter, and the Event that says why (on the side)."""
        if counter == MATCHED_SERIES:
            event = (EventReason.MATCHED, f"series {state.key.series_uid} ({state.attributes.modality or '-'}) "
                     f"-> Job {task_id}", False)
        elif counter == FAILED_TASKS:
            event = (EventReason.TASK_FAILED, f"Job {task_id} failed", True)
        else:
            self.notices.count(fingerprint, counter)
            return
        self.notices.count(fingerprint, counter, event)

    # --- an administrator's requests: the isdr.io/retry, isdr.io/rematch and isdr.io/cancel annotations ---

    def _request(self, body, state: SeriesState, action: AdminAction, value: str, now: float) -> float:
        """Answer one new request annotation: carried out as the rules decide, or refused; either
        way the answer (status.requests) is written with the decision, and said in an Event."""
        if action in (AdminAction.RETRY, AdminAction.REMATCH):
            ready = self.fingerprints.ready()
            if action == AdminAction.RETRY:
                decide = lambda s: retry_decision(s, None, [fp.name for fp in ready])  # noqa: E731
            else:
                decide = lambda s: rematch_decision(s, ready, matching_fingerprints)  # noqa: E731
            decision = decide(state)
            if isinstance(decision, ListStorage):
                state = with_stored(state, *stored_instances(self.storage, state.key))
                state = replace(state, dispatches=self.dispatches.load_all(state.key))
                decision = decide(state)
            if isinstance(decision, Dispatch):
                note = request_note(action, decision)
                self._dispatch(body, state, decision, now, request_status(action, value, True, note, now))
                self._say_answer(body, state, action, True, note)
                return TASK_CHECK_INTERVAL
        else:
            decision = cancel_decision(state, None)
            if isinstance(decision, CancelTasks):
                messages = self._cancel_tasks(state, decision, now)
                note = "; ".join(f"{task_id}: {message}" for task_id, message in messages.items())
                self._write(body, {**failed_tasks_status(body, messages, now),
                                   **request_status(action, value, True, note, now)})
                for task_id in messages:
                    metrics.task_finished(task_id, state.task(task_id).fingerprint, TaskPhase.FAILED)
                self._say_answer(body, state, action, True, note)
                return 0.05
        self._write(body, request_status(action, value, False, decision.reason, now))
        self._say_answer(body, state, action, False, decision.reason)
        return 0.05

    def _cancel_tasks(self, state: SeriesState, decision: CancelTasks, now: float) -> dict[str, str]:
        """End each task's Job and remote task; task id -> the message of its Failed entry."""
        messages = {}
        for task_id in decision.task_ids:
            task = state.task(task_id)
            remote = cancel_task(self.api, self.settings, self.storage, task, self.fingerprints.body(task.fingerprint))
            messages[task_id] = apply_cancel(task, now, remote).message
        return messages

    def _say_answer(self, body, state: SeriesState, action: AdminAction, accepted: bool, message: str) -> None:
        self.notices.event(body, REQUEST_EVENTS[action, accepted], message, warning=not accepted or
                       action == AdminAction.CANCEL)
        (log.warning if accepted else log.info)("series %s: %s %s: %s", state.key.series_uid, action,
                                               "carried out" if accepted else "refused", message)

    # --- writes, each guarded by the resourceVersion the decision was made on ---

    def _write(self, body: dict, status: dict) -> dict:
        """Merge `status` into the DicomSeries if it is still as read (else Conflict); a patch
        that would change nothing is not sent."""
        if status_unchanged(body, status):
            return body
        meta = body["metadata"]
        written = self.api.patch_series_status(meta["name"], status, meta["resourceVersion"])
        self.latest.refresh(written)
        return written

    def _delete(self, body: dict) -> None:
        self.api.delete_series(body["metadata"]["name"], body["metadata"]["resourceVersion"])
        self.latest.drop(body["metadata"]["name"])

    # --- Jobs ---

    def forget_jobs(self) -> None:
        self.jobs_seen.clear()
        self.jobs_copied.clear()
        self.job_reports.clear()

    def job_listed(self, job: dict, finished_tasks: set[str], listed: dict | None = None) -> str | None:
        """A Job from a listing; `finished_tasks` are those whose series' status says they
        finished: their Jobs are only noted, not read again (a finished task stays finished).
        `listed`: its series as the same resync listed it, to read only if the Job has news."""
        task = (job["metadata"].get("labels") or {}).get(LABEL_TASK)
        if task not in finished_tasks:
            return self.job_changed(job, listed)
        name = job["metadata"]["name"]
        self.jobs_seen.add(name)
        if job_outcome(job)[0] != JobOutcome.RUNNING:
            self.jobs_copied.add(name)
        return None

    def job_gone(self, name: str) -> None:
        self.jobs_seen.discard(name)
        self.jobs_copied.discard(name)
        self.job_reports.pop(name, None)

    def job_changed(self, job: dict, seen: dict | None = None) -> str | None:
        """Copy a Job's progress into its DicomSeries; returns the series' name to look at again.

        What the Job's pod counted (errors, a possible duplicate submit) and the task's end are
        counted here once per change of the task's entry: only after the entry was written, and
        never again for what the entry already says (an operator restart reads it back). A Job
        whose end was copied already is not read again (a finished task stays finished), nor is
        the series when `seen` (the series as just listed or watched) already says what it says."""
        labels = job["metadata"].get("labels") or {}
        series_name, task_id = labels.get(LABEL_SERIES), labels.get(LABEL_TASK)
        if not series_name or not task_id:
            return None
        self.jobs_seen.add(job["metadata"]["name"])
        outcome, job_message = job_outcome(job)
        if outcome != JobOutcome.RUNNING and job["metadata"]["name"] in self.jobs_copied:
            return None
        record = read_task(self.storage, task_id)
        phase, message = task_phase_from_job(outcome, job_message, record)
        report = TaskReport(phase, message, record.inference_uid if record else None,
                            record.errors if record else None)
        name = job["metadata"]["name"]
        if self.job_reports.get(name) == report:
            return None
        if labels.get(LABEL_STUDY):
            # A study task: the other series of the study carry it too. Only the labelled one
            # counts and reports it (_copy_job); the others' entries follow.
            for body in self.api.list_series(f"{LABEL_STUDY}={labels[LABEL_STUDY]}"):
                if body["metadata"]["name"] != series_name:
                    self._copy_task(body["metadata"]["name"], task_id, report)
        series, copied = self._copy_job(series_name, task_id, report, record, seen)
        if copied and outcome != JobOutcome.RUNNING:
            self.jobs_copied.add(name)
            self.job_reports.pop(name, None)
        elif copied:
            self.job_reports[name] = report
        return series

    def _copy_task(self, series_name: str, task_id: str, report: TaskReport) -> None:
        for _ in range(CONFLICT_ATTEMPTS):
            body = self.api.get_series(series_name)
            change = None if body is None else task_change(body, task_id, report, self.clock())
            if change is None:
                return
            try:
                self._write(body, change.status)
                return
            except Conflict:
                continue

    def _copy_job(self, series_name: str, task_id: str, report: TaskReport, record: TaskState | None,
                  seen: dict | None) -> tuple[str | None, bool]:
        """(the series to look at again, whether its status now says what the Job says)"""
        known = seen if seen is not None else self.latest.get(series_name)
        if known is not None and task_change(known, task_id, report, self.clock()) is None:
            return None, True
        for attempt in range(CONFLICT_ATTEMPTS):
            # First from the version the watch brought (a stale one is refused: Conflict).
            body = known if attempt == 0 and known is not None else self._read(series_name)
            if body is None:
                return None, True
            change = task_change(body, task_id, report, self.clock())
            if change is None:
                return None, True  # nothing new for the series: it needs no look for this
            try:
                body = self._write(body, change.status)
            except Conflict:
                continue
            entry = change.entry
            metrics.errors_reported(change.new_errors)
            if change.first_uid and record.unknown_submits:
                # The Job's pod counted its repeat too, but nobody scrapes it: the operator does.
                metrics.possible_duplicate_submit()
                self.notices.event(body, EventReason.POSSIBLE_DUPLICATE_SUBMIT,
                               f"Job {entry['job']}: {possible_duplicate_note(record)}", warning=True)
            if change.finished:
                self._task_finished(body, entry, series_state(body))
            return series_name, True
        return series_name, False

    def _task_finished(self, body: dict, entry: dict, state: SeriesState) -> None:
        ok = entry["phase"] == TaskPhase.SUCCEEDED
        metrics.task_finished(entry["taskId"], entry["fingerprint"], entry["phase"],
                              from_rfc3339(entry.get("startTime")), from_rfc3339(entry.get("completionTime")))
        where = f"Job {entry['job']} ({entry['fingerprint']})"
        if ok:
            self.notices.event(body, EventReason.TASK_SUCCEEDED, f"{where}: predictions delivered")
        else:
            self.notices.event(body, EventReason.TASK_FAILED, f"{where}: {entry.get('message') or 'failed'}",
                           warning=True)
        self._count_on_fingerprint(entry["fingerprint"], SUCCEEDED_TASKS if ok else FAILED_TASKS, state,
                                   entry["job"])
