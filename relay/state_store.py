"""The relay's durable state, as small JSON documents in its own storage, beside the instances.

- state/series/<series>.json: a series' decisions (`isdr run` only; on Kubernetes the DicomSeries
  holds them): phase, dispatches with their SOP Instance UIDs, the tasks. Written by the
  scheduler alone. A series that is only receiving has none: its instances are its record.
- state/tasks/<task id>.json: one task's progress (both modes), written by whoever runs it,
  above all the InferenceServer's uid the moment it arrives, so that a task resumes instead of
  submitting again.
- state/dispatches/<series>/<generation>.json: what one dispatch sent (Kubernetes: the
  DicomSeries cannot hold thousands of UIDs; the Job reads its instances from here).
- state/studies/<task id>.json: what one study task sends (both modes): its series, the folder
  each is posted in and their instances, written before any series is told it belongs to it.

Counts and times in these documents are caches; what is stored under series/ is the truth, and a
restart reconciles from it. Every write goes through StateWrites, which says at ERROR when
writes start failing (a full disk) and when they work again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, fields
from typing import Callable, Iterable

from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import Dispatched, SeriesPhase, SeriesState, StudyPart, StudyShare, TaskPhase, TaskState
from relay.storage.base import Storage, StorageError
from relay.uids import SeriesKey

log = logging.getLogger("relay.state")

PREFIX = "state/series/"
TASK_PREFIX = "state/tasks/"
DISPATCH_PREFIX = "state/dispatches/"
STUDY_PREFIX = "state/studies/"
FORMAT_VERSION = 2


class StateWrites:
    """Writes of state documents for one process: reports when storage starts refusing them and
    when it takes them again (ERROR both times), and retries where asked to."""

    def __init__(self, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic):
        self.log = logger
        self.clock = clock
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self._failures = 0

    @property
    def failing(self) -> bool:
        with self._lock:
            return self._failing_since is not None

    def attempt(self, write: Callable[[], None], what: str) -> bool:
        """One try; False (after reporting a new outage) when storage refused it."""
        try:
            write()
        except StorageError as exc:
            with self._lock:
                self._failures += 1
                starts = self._failing_since is None
                if starts:
                    self._failing_since = self.clock()
            if starts:
                self.log.error("cannot save the state of %s: %s; series and tasks wait (and are retried) "
                               "until it can be saved", what, exc)
            return False
        with self._lock:
            since, failures = self._failing_since, self._failures
            self._failing_since, self._failures = None, 0
        if since is not None:
            self.log.error("the state can be saved again after %.0fs (%d writes were refused): series and "
                           "tasks go on", self.clock() - since, failures)
        return True

    def until_done(self, write: Callable[[], None], what: str, should_stop: Callable[[], bool],
                   sleep: Callable[[float], None], max_delay: float = 10.0) -> bool:
        """Retry until the write works (True) or should_stop() (False)."""
        delay = 0.2
        while not self.attempt(write, what):
            if should_stop():
                return False
            sleep(delay)
            delay = min(max_delay, delay * 2)
        return True


# --- tasks ------------------------------------------------------------------------------------


def task_to_dict(task: TaskState) -> dict:
    data = asdict(task)
    data["phase"] = str(task.phase)
    return data


def task_from_dict(data: dict) -> TaskState:
    known = {f.name for f in fields(TaskState)}
    values = {k: v for k, v in data.items() if k in known}
    values["phase"] = TaskPhase(values.get("phase", TaskPhase.PENDING))
    values["delivered"] = {k: tuple(v) for k, v in (values.get("delivered") or {}).items()}
    return TaskState(**values)


class TaskStore:
    """One task's durable record: its state and the instances it sends."""

    def __init__(self, storage: Storage, task_id: str):
        self.storage = storage
        self.task_id = task_id

    @property
    def key(self) -> str:
        return f"{TASK_PREFIX}{self.task_id}.json"

    def load(self) -> tuple[TaskState, tuple[str, ...]] | None:
        try:
            data = json.loads(self.storage.get(self.key))
        except KeyError:
            return None
        return task_from_dict(data["task"]), tuple(data["instances"])

    def save(self, task: TaskState, instances: tuple[str, ...]) -> None:
        document = {"task": task_to_dict(task), "instances": list(instances)}
        self.storage.put_state(self.key, json.dumps(document).encode())

    def delete(self) -> None:
        self.storage.delete([self.key])


def read_task(storage: Storage, task_id: str) -> TaskState | None:
    loaded = TaskStore(storage, task_id).load()
    return loaded[0] if loaded else None


# --- dispatches (Kubernetes) --------------------------------------------------------------------


class DispatchStore:
    """What each dispatch of a series sent, for the operator (which writes it before it records
    the dispatch) and the Jobs (which send exactly that)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _prefix(key: SeriesKey) -> str:
        return f"{DISPATCH_PREFIX}{key.slug}/"

    def save(self, key: SeriesKey, dispatch: Dispatched) -> None:
        document = {"generation": dispatch.generation, "instances": list(dispatch.instances), "at": dispatch.at}
        self.storage.put_state(f"{self._prefix(key)}{dispatch.generation}.json", json.dumps(document).encode())

    def load(self, key: SeriesKey, generation: int) -> Dispatched | None:
        try:
            data = json.loads(self.storage.get(f"{self._prefix(key)}{generation}.json"))
        except KeyError:
            return None
        return Dispatched(int(data["generation"]), tuple(data["instances"]), float(data["at"]))

    def load_all(self, key: SeriesKey) -> tuple[Dispatched, ...]:
        found = []
        for info in self.storage.list(self._prefix(key)):
            try:
                data = json.loads(self.storage.get(info.key))
                found.append(Dispatched(int(data["generation"]), tuple(data["instances"]), float(data["at"])))
            except (KeyError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable dispatch record %s: %s", info.key, exc)
        return tuple(sorted(found, key=lambda d: d.generation))

    def delete_all(self, key: SeriesKey) -> None:
        self.storage.delete_prefix(self._prefix(key))


# --- study tasks (both modes) ---------------------------------------------------------------------


class StudyStore:
    """What each study task sends: its parts, recorded before the task is started (StartStudy)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _key(task_id: str) -> str:
        return f"{STUDY_PREFIX}{task_id}.json"

    def save(self, task_id: str, parts: tuple[StudyPart, ...]) -> None:
        document = {"task_id": task_id, "parts": [
            {"folder": part.folder, "key": {"series_uid": part.key.series_uid, "sop_class_uid": part.key.sop_class_uid},
             "generation": part.generation, "instances": list(part.instances)} for part in parts]}
        self.storage.put_state(self._key(task_id), json.dumps(document).encode())

    def load(self, task_id: str) -> tuple[StudyPart, ...] | None:
        try:
            data = json.loads(self.storage.get(self._key(task_id)))
        except KeyError:
            return None
        return tuple(StudyPart(part["folder"], SeriesKey(**part["key"]), int(part["generation"]),
                               tuple(part["instances"])) for part in data["parts"])

    def delete(self, task_id: str) -> None:
        self.storage.delete([self._key(task_id)])

    def started(self, shares: Iterable[StudyShare]) -> dict[str, tuple[StudyPart, ...]]:
        """The records of the study tasks that `shares` started and that still run (task id ->
        parts), for relay.lifecycle.study_step."""
        running = {s.task.task_id for s in shares if s.task.phase != TaskPhase.WAITING and not s.task.finished}
        return {task_id: parts for task_id in sorted(running) if (parts := self.load(task_id)) is not None}


# --- series (isdr run) ----------------------------------------------------------------------------


def series_to_dict(series: SeriesState) -> dict:
    return {
        "version": FORMAT_VERSION,
        "key": {"series_uid": series.key.series_uid, "sop_class_uid": series.key.sop_class_uid},
        "attributes": asdict(series.attributes),
        "phase": str(series.phase),
        "first_received": series.first_received,
        "last_received": series.last_received,
        "generation": series.generation,
        "dispatches": [asdict(d) for d in series.dispatches],
        "arrivals_seen": series.arrivals_seen,
        "late_instances": series.late_instances,
        "tasks": [task_to_dict(task) for task in series.tasks],
        "finished_at": series.finished_at,
        "cleaned": series.cleaned,
    }


def series_from_dict(data: dict) -> SeriesState:
    """A series document; version 1 (one list of the latest dispatch's instances) is read too."""
    if data.get("version", 1) >= 2:
        dispatches = tuple(Dispatched(int(d["generation"]), tuple(d["instances"]), float(d["at"]))
                           for d in data.get("dispatches", ()))
        arrivals_seen = data.get("arrivals_seen", 0.0)
    else:
        generation = data.get("generation", 0)
        instances = tuple(data.get("dispatched_instances", ()))
        dispatches = (Dispatched(generation, instances, data["last_received"]),) if generation else ()
        arrivals_seen = data["last_received"]
    return SeriesState(
        key=SeriesKey(**data["key"]),
        attributes=SeriesAttributes(**data["attributes"]),
        phase=SeriesPhase(data["phase"]),
        first_received=data["first_received"],
        last_received=data["last_received"],
        instance_count=data.get("instance_count", 0),
        generation=data["generation"],
        dispatches=dispatches,
        arrivals_seen=arrivals_seen,
        late_instances=data.get("late_instances", 0),
        tasks=tuple(task_from_dict(task) for task in data.get("tasks", [])),
        finished_at=data.get("finished_at"),
        cleaned=data.get("cleaned", False),
    )


class SeriesStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _key(key: SeriesKey) -> str:
        return f"{PREFIX}{key.slug}.json"

    def save(self, series: SeriesState) -> None:
        self.storage.put_state(self._key(series.key), json.dumps(series_to_dict(series)).encode())

    def delete(self, key: SeriesKey) -> None:
        self.storage.delete([self._key(key)])

    def load_all(self) -> list[SeriesState]:
        result = []
        for info in self.storage.list(PREFIX):
            try:
                result.append(series_from_dict(json.loads(self.storage.get(info.key))))
            except (KeyError, ValueError, TypeError, StorageError) as exc:
                # A corrupt state file must not stop the relay; its instances are still there
                # and are picked up as a receiving series.
                log.error("ignoring unreadable state %s: %s", info.key, exc)
        return result
