"""The newest version the operator knows of each DicomSeries that waits for a step.

The series watch delivers every change; a step (and a Job's progress) starts from that version
instead of reading the series again (a dispatch was seven API requests in a row, one of them
this GET). Nothing here is trusted for long: every write the operator makes carries the
resourceVersion it was decided on, so a decision made on a version that is no longer the newest
is refused (Conflict), and the step reads the series and decides again.

Only series that wait for a step are held (the watch's triage says which), so the memory
follows the work under way, not the thousands of finished series.
"""

from __future__ import annotations

import threading


def _version(body: dict) -> int | None:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


class LatestSeries:
    def __init__(self):
        self._bodies: dict[str, dict] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, body: dict) -> None:
        """Hold `body`, unless a newer version is held (the watch may bring a version after the
        operator's own write returned a newer one)."""
        with self._lock:
            self._put(body)

    def refresh(self, body: dict) -> None:
        """Hold `body` if its series is held (what the operator's own write returned)."""
        with self._lock:
            if body["metadata"]["name"] in self._bodies:
                self._put(body)

    def _put(self, body: dict) -> None:
        name = body["metadata"]["name"]
        held = self._bodies.get(name)
        if held is not None:
            new, old = _version(body), _version(held)
            if new is not None and old is not None and new < old:
                return
        self._bodies[name] = body

    def get(self, name: str) -> dict | None:
        with self._lock:
            return self._bodies.get(name)

    def drop(self, name: str) -> None:
        with self._lock:
            self._bodies.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._bodies.clear()
