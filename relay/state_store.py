"""Series state persisted as one small JSON document per series, in the relay's own storage.

Used by `isdr run`: a restart reads these back and resumes every dispatched series and task.
Series that are still receiving have no document; they are found again from their instances.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import SeriesState, TaskState
from relay.storage.base import Storage, StorageError
from relay.uids import SeriesKey

log = logging.getLogger("relay.state")

PREFIX = "state/series/"
FORMAT_VERSION = 1


def series_to_dict(series: SeriesState) -> dict:
    data = asdict(series)
    data["key"] = {"series_uid": series.key.series_uid, "sop_class_uid": series.key.sop_class_uid}
    data["version"] = FORMAT_VERSION
    return data


def series_from_dict(data: dict) -> SeriesState:
    tasks = tuple(
        TaskState(**{**task, "delivered": {k: tuple(v) for k, v in task.get("delivered", {}).items()}})
        for task in data.get("tasks", [])
    )
    return SeriesState(
        key=SeriesKey(**data["key"]),
        attributes=SeriesAttributes(**data["attributes"]),
        phase=data["phase"],
        first_received=data["first_received"],
        last_received=data["last_received"],
        instance_count=data["instance_count"],
        generation=data["generation"],
        dispatched_instances=tuple(data.get("dispatched_instances", ())),
        late_instances=data.get("late_instances", 0),
        tasks=tasks,
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
        self.storage.put_bytes(self._key(series.key), json.dumps(series_to_dict(series)).encode())

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
