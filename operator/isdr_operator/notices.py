"""What the operator says on the side: Events, and the counters in the Fingerprints' status.

They are written by a thread of their own, in the order they were said, so that a series' step
(a sender waits for its Job) never waits for them: a dispatch was seven API requests in a row,
four of them for these. Both are best effort, as Kubernetes Events are: an operator killed with
notices queued loses them (the DicomSeries' status, written by the step itself, says what
happened). A Fingerprint's counters are only ever written here, one thread: the increments
that come together are summed and written with one read and one patch, and never race each
other (when the dispatches and the Job watch patched them at once, 5 to 16 patches per burst of
50 were refused as conflicting and sent again).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from relay.kube.api import CONFLICT_ATTEMPTS, Conflict, KubeApi, NotFound
from relay.kube.resources import counter_status

log = logging.getLogger("isdr_operator.notices")

QUEUE_LIMIT = 10_000  # notices waiting; more are dropped, and said so in the log


@dataclass(frozen=True)
class _Event:
    body: dict
    reason: str
    message: str
    warning: bool
    at: float


@dataclass(frozen=True)
class _Count:
    fingerprint: str
    counter: str
    at: float
    # Events about the Fingerprint that follow the count: (reason, message, warning).
    events: tuple[tuple[str, str, bool], ...] = field(default=())


class Notices:
    def __init__(self, api: KubeApi, clock=time.time, limit: int = QUEUE_LIMIT):
        self.api = api
        self.clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=limit)
        self._dropped = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    # --- what the driver says ---

    def event(self, body: dict, reason: str, message: str, warning: bool = False) -> None:
        """An Event on `body`, stamped now, posted soon."""
        meta = body["metadata"]
        about = {key: body[key] for key in ("apiVersion", "kind") if key in body}
        about["metadata"] = {key: meta.get(key) for key in ("name", "uid", "resourceVersion")}
        self._put(_Event(about, str(reason), message, warning, self.clock()))

    def count(self, fingerprint: str, counter: str, *events: tuple[str, str, bool]) -> None:
        """One more on the Fingerprint's `counter`, then `events` on the Fingerprint (a deleted
        Fingerprint counts nothing and is told nothing)."""
        self._put(_Count(fingerprint, counter, self.clock(), tuple(events)))

    def _put(self, notice) -> None:
        self.start()
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            self._dropped += 1
            if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                log.warning("%d notices dropped: the API server does not keep up with them", self._dropped)

    # --- the thread that writes them ---

    def start(self) -> None:
        """Start the writing thread (at the first notice, if not before)."""
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="notices", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then end the thread."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything said so far is written (for the tests); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < 500:  # what else is there now, to sum the counts
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write([notice for notice in batch if notice is not None])
            except Exception:  # noqa: BLE001 - a notice is never worth the thread
                log.exception("could not write %d notices", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
                with self._idle:
                    self._idle.notify_all()
            if any(notice is None for notice in batch):
                return

    def _write(self, batch: list) -> None:
        counts: dict[str, Counter] = {}
        for notice in batch:
            if isinstance(notice, _Count):
                counts.setdefault(notice.fingerprint, Counter())[notice.counter] += 1
        fingerprints: dict[str, dict | None] = {}  # each counted once per batch; None: gone
        for notice in batch:
            if isinstance(notice, _Event):
                self.api.event(notice.body, notice.reason, notice.message, notice.warning, now=notice.at)
                continue
            if notice.fingerprint not in fingerprints:
                fingerprints[notice.fingerprint] = self._add(notice.fingerprint, counts[notice.fingerprint],
                                                             notice.at)
            body = fingerprints[notice.fingerprint]
            for reason, message, warning in notice.events if body is not None else ():
                self.api.event(body, reason, message, warning, now=notice.at)

    def _add(self, name: str, counts: Counter, at: float) -> dict | None:
        """Add `counts` to the Fingerprint's counters: one read, one patch guarded by its version
        (the Ready condition is written by another thread; a conflict reads it again)."""
        for _ in range(CONFLICT_ATTEMPTS):
            body = self.api.get_fingerprint(name)
            if body is None:
                return None
            status: dict = {}
            for counter, added in counts.items():
                status.update(counter_status(body, counter, at, added))
            try:
                self.api.patch_fingerprint_status(name, status, body["metadata"]["resourceVersion"])
            except Conflict:
                continue
            except NotFound:
                return None
            return body
        log.warning("could not add %s to fingerprint %s: it kept changing", dict(counts), name)
        return None

