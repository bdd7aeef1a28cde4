"""`isdr run`'s table of series, in memory: the receiver, the scheduler and the task workers share it.

Each writes its own part: the receiver the facts (an instance arrived, `instance_stored`), the
workers their task's progress, the scheduler its decisions. Its lock guards the table alone and
is never held during I/O or matching: the scheduler decides on a snapshot and commits the outcome
only if the series did not change meanwhile (a revision number, like a resourceVersion), so the
receiver never waits for storage, a fingerprint or a slow disk.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from relay.dicom.receiver import ReceivedInstance
from relay.lifecycle import SeriesState, TaskState, on_instance, update_task
from relay.uids import SeriesKey

log = logging.getLogger("relay.series")


@dataclass
class _Entry:
    state: SeriesState
    revision: int = 0


class SeriesRegistry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._entries: dict[SeriesKey, _Entry] = {}
        self._revisions = 0  # one counter for the table: a forgotten and re-created series never repeats one

    def _bump(self) -> int:
        self._revisions += 1
        return self._revisions

    # --- the receiver's side (InstanceSink): memory only, never I/O ---

    def instance_stored(self, instance: ReceivedInstance) -> None:
        identity = instance.identity
        self.record_instance(identity.series, identity.attributes, identity.sop_instance_uid,
                             instance.received_at)

    def record_instance(self, key, attributes, sop_instance_uid, received_at) -> None:
        with self.lock:
            entry = self._entries.get(key)
            state = on_instance(entry.state if entry else None, key, attributes, sop_instance_uid, received_at)
            if entry is None:
                self._entries[key] = _Entry(state, self._bump())
            else:
                entry.state, entry.revision = state, self._bump()
        if entry is None:
            log.info("series %s (%s) receiving", key.series_uid, attributes.modality or "?")

    def association_ended(self, calling_ae_title: str) -> None:
        pass

    # --- the scheduler's side ---

    def keys(self) -> list[SeriesKey]:
        with self.lock:
            return sorted(self._entries)

    def read(self, key: SeriesKey) -> tuple[SeriesState, int] | None:
        with self.lock:
            entry = self._entries.get(key)
            return None if entry is None else (entry.state, entry.revision)

    def get(self, key: SeriesKey) -> SeriesState | None:
        read = self.read(key)
        return None if read is None else read[0]

    def snapshot(self) -> list[SeriesState]:
        with self.lock:
            return [entry.state for entry in self._entries.values()]

    def load(self, state: SeriesState) -> None:
        """Recovery: a series as the state documents and storage say it is."""
        with self.lock:
            self._entries[state.key] = _Entry(state, self._bump())

    def commit(self, key: SeriesKey, revision: int, state: SeriesState) -> bool:
        """Store the scheduler's decision, unless the series changed since it was read."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None or entry.revision != revision:
                return False
            entry.state, entry.revision = state, self._bump()
            return True

    def forget(self, key: SeriesKey, revision: int) -> bool:
        """Drop the series, unless it changed since it was read (an instance arrived meanwhile)."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None or entry.revision != revision:
                return False
            del self._entries[key]
            return True

    # --- the workers' side ---

    def task_changed(self, key: SeriesKey, task: TaskState) -> None:
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                return  # forgotten meanwhile (a task finishing its remote delete): nothing to tell
            entry.state, entry.revision = update_task(entry.state, task), self._bump()
