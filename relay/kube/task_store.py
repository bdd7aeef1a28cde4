"""A Kubernetes task's durable record, kept in the relay's storage beside the instances.

The Job's pod writes it at every step (the InferenceServer uid above all), so that a retried
pod resumes instead of submitting again; the operator reads it to report the task's progress on
the DicomSeries. Storage, not the API server, because the pod has no API access at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from relay.lifecycle import TaskState
from relay.storage.base import Storage

PREFIX = "state/tasks/"


def _key(task_id: str) -> str:
    return f"{PREFIX}{task_id}.json"


class TaskStore:
    def __init__(self, storage: Storage, task_id: str):
        self.storage = storage
        self.task_id = task_id

    def load(self) -> tuple[TaskState, tuple[str, ...]] | None:
        """The recorded state and the instances the task was started with, or None."""
        try:
            data = json.loads(self.storage.get(_key(self.task_id)))
        except KeyError:
            return None
        task = data["task"]
        task["delivered"] = {k: tuple(v) for k, v in task.get("delivered", {}).items()}
        return TaskState(**task), tuple(data["instances"])

    def save(self, task: TaskState, instances: tuple[str, ...]) -> None:
        document = {"task": asdict(task), "instances": list(instances)}
        self.storage.put_bytes(_key(self.task_id), json.dumps(document).encode())

    def delete(self) -> None:
        self.storage.delete([_key(self.task_id)])


def read_task(storage: Storage, task_id: str) -> TaskState | None:
    loaded = TaskStore(storage, task_id).load()
    return loaded[0] if loaded else None
