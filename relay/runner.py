"""`isdr run`: the whole relay in one process, with no cluster.

Receiver, scheduler and a pool of task workers share one storage root. The scheduler asks the
life-cycle rules (relay.lifecycle) what each series needs and carries it out; the state of every
dispatched series is persisted, so a restart at any moment resumes where the relay stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from relay import metrics
from relay.config import Settings, lifecycle_rules
from relay.dicom.identity import identify_part10
from relay.dicom.receiver import Receiver
from relay.fingerprints.loader import load_fingerprint_dir
from relay.fingerprints.matching import matching_fingerprints
from relay.fingerprints.model import Fingerprint
from relay.lifecycle import (
    RECEIVING,
    TASK_FAILED,
    Cleanup,
    Dispatch,
    DropUnmatched,
    Finish,
    SeriesState,
    TaskState,
    apply_cleanup,
    apply_dispatch,
    apply_finish,
    can_forget,
    next_step,
    on_late_instances,
)
from relay.pipeline import Interrupted, PipelineSettings, TaskRunner, TaskSpec
from relay.registry import SeriesRegistry
from relay.state_store import SeriesStore
from relay.storage import Storage, open_storage
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey, parse_instance_key

log = logging.getLogger("relay.runner")


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
    def __init__(self, settings: Settings, storage: Storage | None = None):
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self.rules = lifecycle_rules(settings)
        self.registry = SeriesRegistry(SeriesStore(self.storage), self.rules)
        self.fingerprints = FingerprintSource(settings.fingerprint_dir)
        self.receiver = Receiver(settings, self.storage, metrics.CountingSink(self.registry))
        self.pipeline_settings = PipelineSettings.from_settings(settings)
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="task")
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None

    # --- start and stop ---

    def start(self) -> None:
        if isinstance(self.storage, LocalStorage):
            self.storage.clean_temporary_files()
        self.fingerprints.refresh()
        self.recover()
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

    # --- recovery ---

    def recover(self) -> None:
        """Rebuild the series table from persisted state and the instances in storage."""
        now = time.time()
        known = {series.key: series for series in self.registry.store.load_all()}
        for series in known.values():
            self.registry.put(series, persist=False)
        instances: dict[SeriesKey, list[str]] = {}
        for info in self.storage.list("series/"):
            parsed = parse_instance_key(info.key)
            if parsed is not None:
                instances.setdefault(parsed[0], []).append(parsed[1])
        for key, uids in instances.items():
            series = known.get(key)
            if series is None:
                self._recover_receiving(key, uids, now)
                continue
            # Instances acknowledged after the dispatch but before their note was persisted.
            late = set(uids) - set(series.dispatched_instances)
            if series.phase != RECEIVING and late and not series.late_instances:
                series, note = on_late_instances(series, len(late), now, self.rules)
                log.warning("series %s: %s", key.series_uid, note)
                self.registry.put(series)
        resumed = 0
        for series in self.registry.snapshot():
            for task in series.active_tasks:
                self._start_task(series, task)
                resumed += 1
        log.info("recovered %d series from %s (%d tasks resumed)",
                 len(self.registry.snapshot()), self.storage.describe(), resumed)

    def _recover_receiving(self, key: SeriesKey, uids: list[str], now: float) -> None:
        try:
            identity = identify_part10(self.storage.get(key.instance_key(uids[0])))
        except Exception as exc:  # an unreadable file must not stop the recovery of the others
            log.error("series %s: cannot read its stored instance: %s", key.series_uid, exc)
            return
        # Restart time counts as the last arrival: the sender may still be sending.
        series = SeriesState(key=key, attributes=identity.attributes, phase=RECEIVING,
                             first_received=now, last_received=now, instance_count=len(uids))
        self.registry.put(series, persist=False)

    # --- scheduling ---

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
        for series in self.registry.snapshot():
            with self.registry.lock:
                current = self.registry.get(series.key)
                if current is None:
                    continue
                step = next_step(current, fingerprints, now, self.rules, matching_fingerprints)
                self._carry_out(current, step, now)

    def _carry_out(self, series: SeriesState, step, now: float) -> None:
        key = series.key
        if isinstance(step, Dispatch):
            uids = self._stored_instances(key)
            if not uids:
                log.warning("series %s: no instances left in storage; forgetting it", key.series_uid)
                self.registry.forget(key, persisted=series.generation > 0)
                return
            series = apply_dispatch(series, step, uids, now)
            self.registry.put(series)
            log.info("series %s complete with %d instances: dispatched to %s",
                     key.series_uid, len(uids), ", ".join(step.fingerprints))
            for task in series.active_tasks:
                self._start_task(series, task)
        elif isinstance(step, DropUnmatched):
            removed = self.storage.delete_prefix(key.prefix)
            log.info("series %s (modality %s) matches no fingerprint: deleted its %d instances",
                     key.series_uid, series.attributes.modality or "?", removed)
            self.registry.forget(key, persisted=series.generation > 0)
        elif isinstance(step, Finish):
            self.registry.put(apply_finish(series, step, now))
            failed = [t for t in series.tasks if t.phase == TASK_FAILED]
            log.info("series %s %s (%d tasks, %d failed)", key.series_uid, step.phase.lower(),
                     len(series.tasks), len(failed))
        elif isinstance(step, Cleanup):
            if step.delete_instances:
                removed = self.storage.delete_prefix(key.prefix)
                log.info("series %s: deleted its %d instances (DELETE_ON_POST)", key.series_uid, removed)
            self.registry.put(apply_cleanup(series))
        elif can_forget(series, now, self.rules):
            self.registry.forget(key)

    def _stored_instances(self, key: SeriesKey) -> list[str]:
        uids = []
        for info in self.storage.list(key.prefix):
            parsed = parse_instance_key(info.key)
            if parsed is not None and parsed[0] == key:
                uids.append(parsed[1])
        return uids

    # --- tasks ---

    def _start_task(self, series: SeriesState, task: TaskState) -> None:
        with self._running_lock:
            if task.task_id in self._running:
                return
            self._running.add(task.task_id)
        metrics.task_started(task.task_id, task.fingerprint)
        self._pool.submit(self._run_task, series.key, task.task_id)

    def _run_task(self, key: SeriesKey, task_id: str) -> None:
        task_log = logging.getLogger(f"relay.task.{task_id}")
        try:
            series = self.registry.get(key)
            task = next(t for t in series.tasks if t.task_id == task_id)
            fingerprint = self.fingerprints.by_name(task.fingerprint)
            if fingerprint is None:
                self.registry.save_task(key, replace(
                    task, phase=TASK_FAILED, updated_at=time.time(),
                    message=f"fingerprint {task.fingerprint!r} no longer exists"))
                task_log.error("fingerprint %s no longer exists; task failed", task.fingerprint)
                metrics.task_finished(task_id, task.fingerprint, TASK_FAILED)
                return
            spec = TaskSpec(task_id=task_id, series=key, instance_uids=series.dispatched_instances,
                            fingerprint=fingerprint)
            runner = TaskRunner(
                self.storage,
                self.pipeline_settings,
                save=lambda state: self.registry.save_task(key, state),
                say=task_log.info,
                should_stop=self._stop.is_set,
            )
            final = runner.run(spec, task)
            metrics.task_finished(task_id, task.fingerprint, final.phase)
        except Interrupted:
            task_log.info("interrupted by shutdown; resumes at the next start")
        except Exception:
            task_log.exception("task crashed; it resumes at the next start")
        finally:
            with self._running_lock:
                self._running.discard(task_id)
