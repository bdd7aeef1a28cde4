"""The operator's own watches of DicomSeries and Jobs: list a page at a time, then watch.

kopf would watch them too, but at start-up it turns every object it lists into a handler call of
its own (a worker, a queue, a patch check): with 10 000 DicomSeries that was 20 s of work and
150 MiB more memory before a series arriving meanwhile was looked at. The operator needs less:
each object goes to one function (`on_event`) that decides from the object alone whether and
when it needs a step (isdr_operator.runtime); kopf keeps the Fingerprints, the peering and the
probes. Each Watch has one thread; a listing holds one page at a time.

Events: type None for each listed object (at start and whenever the watch's version expired),
then "ADDED", "MODIFIED", "DELETED" as the API server sends them. While the API is unavailable the
watch waits (outage_backoff) and carries on from the version it had reached.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable, Iterator

from relay.kube.api import ApiError, Expired, Listing, outage_backoff

log = logging.getLogger("isdr_operator.watching")


class Watch:
    def __init__(self, kind: str, listing: Callable[[], Listing],
                 watch: Callable[[str], Iterable[tuple[str, dict]]], on_event: Callable[[str | None, dict], None]):
        self.kind = kind
        self._listing = listing
        self._watch = watch
        self._on_event = on_event
        self._since: str | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.listed = threading.Event()  # set once the first listing was delivered

    def _deliver(self, event_type: str | None, body: dict) -> None:
        try:
            self._on_event(event_type, body)
        except Exception:  # noqa: BLE001 - one object must not stop the watch of the others
            log.exception("%s %s: handling its %s event failed", self.kind, body.get("metadata", {}).get("name"),
                          event_type or "listing")

    def _list(self) -> None:
        listing = self._listing()
        for body in listing:
            self._deliver(None, body)
        self._since = listing.resource_version
        self.listed.set()

    def _follow(self) -> None:
        for event_type, body in self._watch(self._since):
            version = (body.get("metadata") or {}).get("resourceVersion")
            if event_type != "BOOKMARK":
                self._deliver(event_type, body)
            if version:
                self._since = version
            if self._stopped.is_set():
                return

    def run(self) -> None:
        delays: Iterator[float] = iter(outage_backoff())
        while not self._stopped.is_set():
            try:
                if self._since is None:
                    self._list()
                self._follow()
                delays = iter(outage_backoff())  # a watch that ran and ended: all is well
            except Expired:
                log.info("%s: the watch's version expired; listing them again", self.kind)
                self._since = None
            except ApiError as exc:
                delay = next(delays)
                log.warning("%s: cannot watch (%s); trying again in %.0fs", self.kind, exc, delay)
                self._stopped.wait(delay)
            except Exception:  # noqa: BLE001 - the watch must go on
                delay = next(delays)
                log.exception("%s: the watch failed; trying again in %.0fs", self.kind, delay)
                self._stopped.wait(delay)

    def start(self, since: str | None = None) -> None:
        """Watch from `since` (a listing's version whose objects were delivered already), else
        list first."""
        self._since = since
        if since is not None:
            self.listed.set()
        self._thread = threading.Thread(target=self.run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """The thread ends with the watch's next event or its end (a daemon: not waited for)."""
        self._stopped.set()
