"""`isdr run`: the whole relay in one process, with no cluster.

Receiver, scheduler and a pool of task workers share one storage root. The scheduler's loop is
the operator's: read a series, ask the life-cycle rules (relay.lifecycle) for the next step,
persist it, carry it out. Every decision is persisted before it is carried out, every task
records its own progress, and what the receiver acknowledged is in storage, so a restart at any
moment resumes where the relay stopped.
"""

from __future__ import annotations

import heapq
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from relay import metrics
from relay.admin_requests import Request, RequestStore
from relay.config import Settings, lifecycle_rules
from relay.dicom.identity import identify_part10
from relay.dicom.receiver import Receiver
from relay.fingerprints.loader import load_fingerprint_dir
from relay.fingerprints.matching import matching_fingerprints
from relay.fingerprints.model import Fingerprint
from relay.lifecycle import (
    CANCEL_PRIORITY,
    AdminAction,
    Cleanup,
    Dispatch,
    DropUnmatched,
    Finish,
    Forget,
    KeepUnmatched,
    ListStorage,
    NoteArrivals,
    Refused,
    Reopen,
    SeriesPhase,
    SeriesState,
    TaskPhase,
    TaskState,
    Wait,
    apply_cleanup,
    apply_dispatch,
    apply_finish,
    apply_keep_unmatched,
    apply_note_arrivals,
    apply_reopen,
    arrivals_note,
    cancel_decision,
    forget_note,
    new_series,
    next_step,
    rematch_decision,
    request_note,
    retry_decision,
    start_order,
    study_shares_note,
    unmatched_note,
    with_stored,
)
from relay.pipeline import (
    Interrupted,
    NoSpaceForWork,
    PipelineSettings,
    TaskRunner,
    TaskSpec,
    sweep_work_folders,
)
from relay.registry import SeriesRegistry
from relay.state_store import SeriesStore, StateWrites, StudyStore, TaskStore
from relay.studies import StudyScheduler
from relay.storage import Storage, open_storage
from relay.storage.instances import stored_instances, stored_series
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey

log = logging.getLogger("relay.runner")
task_log = logging.getLogger("relay.task")  # one task's story, step by step, its id in every line

CONFLICT_ATTEMPTS = 3  # a series that keeps changing under a decision is looked at next tick
CRASHED_TASK_RETRY = 30.0  # seconds before a task whose worker crashed is started again


class FingerprintSource:
    """Fingerprints from FINGERPRINT_DIR, re-read when a file in it changes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._signature = None
        self.fingerprints: tuple[Fingerprint, ...] = ()

    def _current_signature(self):
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                for p in self.folder.iterdir() if p.is_file()))
        except OSError:
            return None

    def refresh(self) -> tuple[Fingerprint, ...]:
        signature = self._current_signature()
        if signature == self._signature:
            return self.fingerprints
        self._signature = signature
        if signature is None:
            log.warning("fingerprint folder %s does not exist: no series will match", self.folder)
            self.fingerprints = ()
            return self.fingerprints
        result = load_fingerprint_dir(self.folder)
        for problem in result.problems:
            log.error("fingerprint problem: %s", problem)
        self.fingerprints = tuple(result.fingerprints)
        names = ", ".join(fp.name for fp in self.fingerprints) or "none"
        log.info("loaded %d fingerprints from %s: %s", len(self.fingerprints), self.folder, names)
        return self.fingerprints

    def by_name(self, name: str) -> Fingerprint | None:
        return next((fp for fp in self.fingerprints if fp.name == name), None)


class Relay:
    def __init__(self, settings: Settings, storage: Storage | None = None, matcher=matching_fingerprints):
        self.settings = settings
        self.storage = storage or open_storage(settings, receiving=True)
        self.rules = lifecycle_rules(settings)
        self.matcher = matcher
        self.registry = SeriesRegistry()
        self.series_store = SeriesStore(self.storage)
        self.writes = StateWrites(logging.getLogger("relay.state"))
        self.fingerprints = FingerprintSource(settings.fingerprint_dir)
        self.receiver = Receiver(settings, self.storage, metrics.CountingSink(self.registry))
        self.pipeline_settings = PipelineSettings.from_settings(settings)
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="task")
        self._running: set[str] = set()
        self._crashed: dict[str, float] = {}  # task id -> monotonic time it may start again
        self._running_lock = threading.Lock()
        self._waiting: list[tuple[tuple[int, int], SeriesKey, str]] = []  # a heap, by lifecycle.start_order
        self._queued = 0
        self._cancelled: set[str] = set()  # task ids an administrator cancelled, until their workers end
        self._cancelling: dict[str, tuple[SeriesKey, tuple[str, ...]]] = {}  # cancel request id -> its tasks
        self.requests = RequestStore(self.storage)
        self._unsaved: set[SeriesKey] = set()  # decided in memory, not yet persisted (scheduler only)
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self.studies = StudyScheduler(self.storage, self.registry, self._persist, self._ensure_running)

    # --- start and stop ---

    def start(self) -> None:
        if isinstance(self.storage, LocalStorage):
            self.storage.clean_temporary_files()
        removed = sweep_work_folders(self.settings.task_work_root)
        if removed:
            log.info("removed %d task work folder(s) left by an earlier run in %s", removed,
                     self.settings.task_work_root)
        self.fingerprints.refresh()
        self.recover()
        self.requests.sweep_answers(time.time())
        self.receiver.start()
        self._scheduler = threading.Thread(target=self._schedule_forever, name="scheduler", daemon=True)
        self._scheduler.start()

    def stop(self) -> None:
        log.info("stopping: no new associations; running tasks resume at the next start")
        self.receiver.stop(drain_timeout=10.0)  # let running associations finish
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.storage.close()

    def serve_forever(self) -> None:
        def _signal(signum, _frame):
            log.info("received signal %d", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # --- recovery: the state documents, reconciled with what storage holds ---

    def recover(self) -> None:
        now = time.time()
        documents = {series.key: series for series in self.series_store.load_all()}
        stored = stored_series(self.storage)
        for key, series in documents.items():
            uids, newest, _sample = stored.get(key, ([], None, ""))
            series = with_stored(series, uids, newest)
            self.registry.load(replace(series, tasks=tuple(self._recorded(task) for task in series.tasks)))
        for key, (uids, _newest, sample) in stored.items():
            if key not in documents:
                self._recover_receiving(key, uids, sample, now)
        resumed = sum(self._ensure_running(series) for series in self.registry.snapshot())
        log.info("recovered %d series from %s (%d tasks resumed)",
                 len(self.registry.keys()), self.storage.describe(), resumed)

    def _recorded(self, task: TaskState) -> TaskState:
        """A task as its own record says (it is written at every step, the series document not)."""
        loaded = TaskStore(self.storage, task.task_id).load()
        return loaded[0] if loaded else task

    def _recover_receiving(self, key: SeriesKey, uids: list[str], sample: str, now: float) -> None:
        try:
            identity = identify_part10(self.storage.get(sample))
        except Exception as exc:  # an unreadable file must not stop the recovery of the others
            log.error("series %s: cannot read its stored instance: %s", key.series_uid, exc)
            return
        # Restart time counts as the last arrival: the sender may still be sending.
        self.registry.load(with_stored(new_series(key, identity.attributes, now), uids, None))

    # --- the scheduler: read, ask the rules, persist, carry out ---

    def _schedule_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive any one bad series
                log.exception("scheduler tick failed")
            self._stop.wait(self.settings.post_interval)

    def tick(self, now: float | None = None) -> None:
        fingerprints = self.fingerprints.refresh()
        now = time.time() if now is None else now
        self.handle_requests(fingerprints, now)
        for key in self.registry.keys():
            try:
                self.look_at(key, fingerprints, now)
            except Exception:  # one bad series must not stop the others
                log.exception("series %s: its next step failed; it is looked at again", key.series_uid)
        self.studies.tick(fingerprints, now)

    def look_at(self, key: SeriesKey, fingerprints, now: float) -> None:
        for _ in range(CONFLICT_ATTEMPTS):
            read = self.registry.read(key)
            if read is None:
                return
            state, revision = read
            if key in self._unsaved and not self._persist(state):
                return  # storage still refuses: nothing is decided on top of an unsaved decision
            step = next_step(state, fingerprints, now, self.rules, self.matcher)
            if isinstance(step, ListStorage):
                state = with_stored(state, *stored_instances(self.storage, key))
                step = next_step(state, fingerprints, now, self.rules, self.matcher)
            if self._carry_out(key, revision, state, step, now):
                return

    def _carry_out(self, key: SeriesKey, revision: int, state: SeriesState, step, now: float) -> bool:
        """Carry out `step`; False when the series changed meanwhile (decide again)."""
        uid = key.series_uid
        if isinstance(step, Wait):
            self._ensure_running(state)
            return True
        if isinstance(step, DropUnmatched):
            if not self.registry.forget(key, revision):
                return False
            self.storage.delete([key.instance_key(sop) for sop in step.instances])
            self.series_store.delete(key)
            log.info("series %s (modality %s) matches no fingerprint: deleted its %d instances",
                     uid, state.attributes.modality or "?", len(step.instances))
            return True
        if isinstance(step, Forget):
            if not self.registry.forget(key, revision):
                return False
            if step.delete:
                self.storage.delete([key.instance_key(sop) for sop in step.delete])
                log.warning("series %s: %s", uid, forget_note(step))
            for task in state.tasks:
                TaskStore(self.storage, task.task_id).delete()
                if task.entry:
                    StudyStore(self.storage).delete(task.task_id)
            self.series_store.delete(key)
            self._unsaved.discard(key)
            log.info("series %s forgotten", uid)
            return True
        if isinstance(step, Cleanup) and step.delete:
            # Only instances of a finished dispatch; deleting again after a crash is harmless.
            self.storage.delete([key.instance_key(sop) for sop in step.delete])
        after = self._apply(state, step, now)
        if not self.registry.commit(key, revision, after):
            return False
        saved = self._persist(after)
        self._report(state, step, now)
        if saved:
            self._ensure_running(after)
        return True

    def _apply(self, state: SeriesState, step, now: float) -> SeriesState:
        if isinstance(step, Dispatch):
            return apply_dispatch(state, step, now)
        if isinstance(step, Reopen):
            return apply_reopen(state, step)
        if isinstance(step, NoteArrivals):
            return apply_note_arrivals(state, step)
        if isinstance(step, Finish):
            return apply_finish(state, step, now)
        if isinstance(step, KeepUnmatched):
            return apply_keep_unmatched(state, step, now)
        if isinstance(step, Cleanup):
            return apply_cleanup(state, step)
        raise TypeError(f"no state change for {step!r}")

    def _report(self, state: SeriesState, step, now: float) -> None:
        uid = state.key.series_uid
        if isinstance(step, KeepUnmatched):
            log.info("series %s (modality %s): %s", uid, state.attributes.modality or "?", unmatched_note(step, now))
        elif isinstance(step, Dispatch):
            log.info("series %s complete with %d instances: dispatch #%d to %s%s", uid, len(step.instances),
                     step.generation, ", ".join(step.fingerprints), study_shares_note(step))
        elif isinstance(step, Reopen):
            log.warning("series %s: %s", uid, arrivals_note(state, step, self.rules))
        elif isinstance(step, NoteArrivals):
            note = arrivals_note(state, step, self.rules)
            (log.warning if step.late_instances > state.late_instances else log.info)("series %s: %s", uid, note)
        elif isinstance(step, Finish):
            failed = sum(task.phase == TaskPhase.FAILED for task in state.tasks)
            log.info("series %s %s (%d tasks, %d failed)", uid, step.phase.lower(), len(state.tasks), failed)
        elif isinstance(step, Cleanup) and step.delete:
            log.info("series %s: deleted its %d instances (DELETE_ON_POST)", uid, len(step.delete))

    def _persist(self, state: SeriesState) -> bool:
        if self.writes.attempt(lambda: self.series_store.save(state), f"series {state.key.series_uid}"):
            self._unsaved.discard(state.key)
            return True
        self._unsaved.add(state.key)
        return False

    # --- tasks ---

    def _ensure_running(self, series: SeriesState) -> int:
        """Give every task that needs work a worker (once); returns how many were started."""
        if series.key in self._unsaved or series.phase == SeriesPhase.RECEIVING and not series.tasks:
            return 0
        started = 0
        for task in series.tasks:
            # (a study's share waits for its study's decision: relay.studies)
            if task.needs_work and task.phase != TaskPhase.WAITING and self._start_task(series.key, task):
                started += 1
        return started

    def _start_task(self, key: SeriesKey, task: TaskState) -> bool:
        with self._running_lock:
            if task.task_id in self._running or self._stop.is_set():
                return False
            if time.monotonic() < self._crashed.get(task.task_id, 0.0):
                return False
            self._running.add(task.task_id)
        if not task.finished:  # (a finished one only has its remote delete left)
            metrics.task_started(task.task_id, task.fingerprint)
        fingerprint = self.fingerprints.by_name(task.fingerprint)
        self._enqueue(key, task.task_id, fingerprint.priority if fingerprint else 0)
        return True

    def _enqueue(self, key: SeriesKey, task_id: str, priority: int) -> None:
        """Queue a task for a worker; a free worker takes the waiting task that start_order puts
        first (the fingerprint's priority: a stroke protocol does not wait behind a backlog)."""
        with self._running_lock:
            self._queued += 1
            heapq.heappush(self._waiting, (start_order(priority, self._queued), key, task_id))
        self._pool.submit(self._run_next)  # one pool job per queued task, each runs the first waiting

    def _run_next(self) -> None:
        with self._running_lock:
            if not self._waiting:
                return
            _order, key, task_id = heapq.heappop(self._waiting)
        self._run_task(key, task_id)

    def _run_task(self, key: SeriesKey, task_id: str) -> None:
        def say(line: str) -> None:
            task_log.info("task %s: %s", task_id, line)

        def warn(line: str) -> None:
            task_log.warning("task %s: %s", task_id, line)

        try:
            series = self.registry.get(key)
            task = series.task(task_id) if series else None
            if task is None:
                return
            instances = series.instances_of(task.generation)
            parts = StudyStore(self.storage).load(task_id) if task.entry else ()
            if parts is None:
                raise RuntimeError(f"the record of study task {task_id} is missing")
            if parts:
                instances = tuple(uid for part in parts for uid in part.instances)
            store = TaskStore(self.storage, task_id)
            members = sorted({key} | {part.key for part in parts})
            cancelled = lambda: task_id in self._cancelled  # noqa: E731

            def save(state: TaskState) -> None:
                if not self.writes.until_done(lambda: store.save(state, instances), f"task {task_id}",
                                              self._stop.is_set, self._stop.wait):
                    raise Interrupted()
                for member in members:  # a study task: every series of it carries it
                    self.registry.task_changed(member, state)

            fingerprint = self.fingerprints.by_name(task.fingerprint)
            if fingerprint is None:
                if task.finished:
                    save(replace(task, remote_delete_pending=False, updated_at=time.time()))
                    warn(f"fingerprint {task.fingerprint} no longer exists: its remote task "
                         f"{task.inference_uid} is not deleted")
                else:
                    save(replace(task, phase=TaskPhase.FAILED, updated_at=time.time(),
                                 message=f"fingerprint {task.fingerprint!r} no longer exists"))
                    warn(f"fingerprint {task.fingerprint} no longer exists; task failed")
                    metrics.task_finished(task_id, task.fingerprint, TaskPhase.FAILED)
                return
            spec = TaskSpec(task_id=task_id, series=key, generation=task.generation, instance_uids=instances,
                            fingerprint=fingerprint, parts=parts)
            runner = TaskRunner(self.storage, self.pipeline_settings, save=save, say=say, warn=warn,
                                work_root=self.settings.task_work_root,
                                should_stop=lambda: self._stop.is_set() or cancelled())
            was_finished = task.finished
            try:
                final = runner.cancel(spec, task) if cancelled() and not was_finished else runner.run(spec, task)
            except Interrupted:
                if not cancelled() or self._stop.is_set():
                    raise
                final = runner.cancel(spec, self._recorded(self.registry.get(key).task(task_id)))
            if not was_finished:
                metrics.task_finished(task_id, task.fingerprint, final.phase)
        except Interrupted:
            task_log.info("task %s: interrupted by shutdown; resumes at the next start", task_id)
        except NoSpaceForWork as exc:
            task_log.error("task %s waits for disk space (tried again in %.0fs): %s", task_id, CRASHED_TASK_RETRY, exc)
            with self._running_lock:
                self._crashed[task_id] = time.monotonic() + CRASHED_TASK_RETRY
        except Exception:
            task_log.exception("task %s crashed; it is started again in %.0fs", task_id, CRASHED_TASK_RETRY)
            with self._running_lock:
                self._crashed[task_id] = time.monotonic() + CRASHED_TASK_RETRY
        finally:
            with self._running_lock:
                self._running.discard(task_id)
                self._cancelled.discard(task_id)

    # --- an administrator's requests (`isdr series retry|rematch|cancel`; relay.admin_requests) ---

    def handle_requests(self, fingerprints, now: float) -> None:
        for request in self.requests.pending():
            if request.id in self._cancelling:
                self._cancel_recorded(request.id)
                continue
            try:
                accepted, message = self._carry_out_request(request, fingerprints, now)
            except Exception as exc:  # one bad request must not stop the scheduler
                log.exception("request %s (%s of series %s) failed", request.id, request.action, request.series)
                accepted, message = False, f"failed: {exc}"
            log.info("request %s: %s of series %s%s: %s", request.id, request.action, request.series,
                     f" task {request.task}" if request.task else "", message)
            # A cancel is answered at once, and its request kept until every task it stops is
            # recorded as ended: a restart in between carries it out again.
            keep = request.id in self._cancelling
            self.writes.attempt(lambda: self.requests.answer(request.id, accepted, message, now, keep_request=keep),
                                f"the answer to request {request.id}")

    def _cancel_recorded(self, request_id: str) -> None:
        """Drop a cancel request once each task it stopped is recorded as ended."""
        key, task_ids = self._cancelling[request_id]
        state = self.registry.get(key)
        if state is None or all((task := state.task(t)) is None or task.finished for t in task_ids):
            del self._cancelling[request_id]
            self.writes.attempt(lambda: self.requests.done(request_id), f"request {request_id}")

    def _carry_out_request(self, request: Request, fingerprints, now: float) -> tuple[bool, str]:
        keys = [key for key in self.registry.keys() if key.series_uid == request.series]
        if request.task is not None:
            keys = [key for key in keys if (state := self.registry.get(key)) and state.task(request.task)]
        if not keys:
            what = f"task {request.task} of series" if request.task else "series"
            return False, f"the relay knows no {what} {request.series}"
        outcomes = [self._request_on(key, request, fingerprints, now) for key in keys]
        return any(ok for ok, _ in outcomes), "; ".join(message for _, message in outcomes)

    def _request_on(self, key: SeriesKey, request: Request, fingerprints, now: float) -> tuple[bool, str]:
        for _ in range(CONFLICT_ATTEMPTS):
            read = self.registry.read(key)
            if read is None:
                return False, "the series was forgotten meanwhile"
            state, revision = read
            if request.action == AdminAction.CANCEL:
                return self._cancel(key, cancel_decision(state, request.task), request.id)
            if request.action == AdminAction.REMATCH:
                decide = lambda s: rematch_decision(s, fingerprints, self.matcher)  # noqa: E731
            else:
                decide = lambda s: retry_decision(s, request.task, [fp.name for fp in fingerprints])  # noqa: E731
            decision = decide(state)
            if isinstance(decision, ListStorage):
                state = with_stored(state, *stored_instances(self.storage, key))
                decision = decide(state)
            if isinstance(decision, Refused):
                return False, decision.reason
            if self._carry_out(key, revision, state, decision, now):
                log.warning("series %s: %s", key.series_uid, request_note(request.action, decision))
                return True, request_note(request.action, decision)
        return False, "the series kept changing; ask again"

    def _cancel(self, key: SeriesKey, decision, request_id: str) -> tuple[bool, str]:
        """Each task's worker stops at its next step (a running upload ends first), deletes the
        remote task and records the task as Failed; a task waiting for a worker gets one now."""
        if isinstance(decision, Refused):
            return False, decision.reason
        self._cancelling[request_id] = (key, decision.task_ids)
        for task_id in decision.task_ids:
            with self._running_lock:
                self._cancelled.add(task_id)
                start = task_id not in self._running
                if start:
                    self._running.add(task_id)
            if start:
                self._enqueue(key, task_id, CANCEL_PRIORITY)
        return True, f"cancelling task(s) {', '.join(decision.task_ids)}"
