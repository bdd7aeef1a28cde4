"""The all-in-one runner's table of series: in memory, persisted at every transition.

The receiver tells it about every durable instance; the scheduler asks it what each series needs
next; workers record task progress through it. One lock serialises all three, so a transition is
never decided on a state that another thread is changing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from relay.dicom.receiver import ReceivedInstance
from relay.lifecycle import RECEIVING, Rules, SeriesState, TaskState, on_instance, update_task
from relay.state_store import SeriesStore
from relay.uids import SeriesKey

log = logging.getLogger("relay.series")


class SeriesRegistry:
    def __init__(self, store: SeriesStore, rules: Rules, clock: Callable[[], float] = time.time):
        self.store = store
        self.rules = rules
        self.clock = clock
        self.lock = threading.RLock()
        self._series: dict[SeriesKey, SeriesState] = {}

    # --- the receiver's side (InstanceSink) ---

    def instance_stored(self, instance: ReceivedInstance) -> None:
        identity = instance.identity
        self.record_instance(identity.series, identity.attributes, identity.sop_instance_uid,
                             instance.received_at)

    def record_instance(self, key, attributes, sop_instance_uid, received_at) -> None:
        with self.lock:
            before = self._series.get(key)
            after, note = on_instance(before, key, attributes, sop_instance_uid, received_at, self.rules)
            self._series[key] = after
            if before is None:
                log.info("series %s (%s) receiving", key.series_uid, attributes.modality or "?")
            if note:
                log.warning("series %s: %s", key.series_uid, note)
            # A series that was only receiving has no document: its instances are its record.
            if before is not None and before.phase != RECEIVING:
                self.store.save(after)

    def association_ended(self, calling_ae_title: str) -> None:
        pass

    # --- the scheduler's and workers' side ---

    def get(self, key: SeriesKey) -> SeriesState | None:
        with self.lock:
            return self._series.get(key)

    def snapshot(self) -> list[SeriesState]:
        with self.lock:
            return list(self._series.values())

    def put(self, series: SeriesState, persist: bool = True) -> None:
        with self.lock:
            self._series[series.key] = series
            if persist:
                self.store.save(series)

    def forget(self, key: SeriesKey, persisted: bool = True) -> None:
        with self.lock:
            self._series.pop(key, None)
            if persisted:
                self.store.delete(key)

    def save_task(self, key: SeriesKey, task: TaskState) -> None:
        with self.lock:
            series = self._series.get(key)
            if series is None:
                raise KeyError(f"task {task.task_id}: series {key} is no longer known")
            series = update_task(series, task)
            self._series[key] = series
            self.store.save(series)
