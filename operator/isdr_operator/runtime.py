"""The operator's long-lived parts, wired together: API, storage, fingerprints, driver, scheduler,
the watches of DicomSeries and Jobs, and the peering gate that lets them act only while this is
the one active operator."""

from __future__ import annotations

import logging
from typing import Callable

from relay.kube.api import KubeApi, Listing
from relay.kube.resources import finished_task_ids, is_receiving, job_series, ready_status, tasks_under_way
from relay.storage import open_storage

from isdr_operator.driver import SeriesDriver
from isdr_operator.fingerprints import FingerprintSet, evaluate, ready_condition
from isdr_operator.peering import Gate
from isdr_operator.notices import Notices
from isdr_operator.scheduler import Scheduler, SchedulerStuck, Work
from isdr_operator.settings import OperatorSettings
from isdr_operator.watching import Watch

log = logging.getLogger("isdr_operator")

FINGERPRINTS_PENDING_RETRY = 0.2  # seconds: a series due before the Fingerprints are read
# A watched version is kept for a look due within this many seconds (a series receiving, or with
# tasks under way); the thousands of finished series waiting for SERIES_RETENTION are read again
# when their time comes, not held in memory until then.
KEEP_VERSION_FOR = 60.0


class Runtime:
    def __init__(self, api: KubeApi, settings: OperatorSettings, clock=None, gate: Gate | None = None):
        import time

        self.api = api
        self.settings = settings
        self.clock = clock or time.time
        self.storage = open_storage(settings.relay)
        self.fingerprints = FingerprintSet()
        self.notices = Notices(api, self.clock)
        self.driver = SeriesDriver(api, settings, self.storage, self.fingerprints, clock=self.clock,
                                   notices=self.notices)
        self.gate = gate or Gate.standalone()
        self.gate.on_change(self._gate_changed)
        self.scheduler = Scheduler(self._step, gate=self.gate)
        self.series_watch = Watch("DicomSeries", api.series_listing, api.watch_series, self.series_event)
        self.job_watch = Watch("Jobs", api.jobs_listing, api.watch_jobs, self.job_event)
        self._activations = 0
        self._listed: dict[str, str | None] = {}  # the last resync's listing versions
        # While a resync lists the series: the ones the watch brought meanwhile (newer than listed).
        self._watched_while_listing: set[str] | None = None
        # Called with every DicomSeries event and listed object: (event type, name, body).
        self.series_observers: list[Callable[[str | None, str, dict], None]] = []

    @property
    def active(self) -> bool:
        return self.gate.is_open

    def start(self) -> None:
        """Start the scheduler, the watches and the peering gate; nothing is written before the
        gate opens (at once when standalone: the watches then go on from the resync's listings)."""
        self.notices.start()
        self.scheduler.start()
        if self.gate.is_open:
            self._gate_changed(True)
        if not self.series_watch.started:
            self.series_watch.start(since=self._listed.get("series"))
        self.job_watch.start(since=self._listed.get("jobs"))
        self.gate.start()

    def stop(self) -> None:
        self.gate.stop()
        for watch in (self.series_watch, self.job_watch):
            watch.stop()
        self.scheduler.stop()
        self.notices.stop()

    def health(self, stuck_after: float) -> dict:
        """For the liveness probe: the scheduler's, and whether the watches still run."""
        health = self.scheduler.health(stuck_after=stuck_after)
        for watch in (self.series_watch, self.job_watch):
            if not watch.alive:
                raise SchedulerStuck(f"the watch of {watch.kind} is not running")
        return health

    def _gate_changed(self, active: bool) -> None:
        if active:
            self.resync()
        else:
            # Fingerprints applied or deleted while paused are read again by the next resync.
            self.fingerprints.loaded.clear()

    def _step(self, name: str) -> float | None:
        """The driver's step, once this activation's Fingerprints are read. The gate opens before
        the resync reads them, and the watches bring series from the start: a complete series
        looked at before its Fingerprint is known would be taken for unmatched, and its
        instances deleted."""
        if not self.fingerprints.loaded.is_set():
            return FINGERPRINTS_PENDING_RETRY
        return self.driver.step(name)

    def resync(self) -> None:
        """Catch up with everything that happened while this operator was not active (or not
        running): Fingerprints, then Jobs, then every series that needs a look.

        The series are read first, a page at a time, and triaged from what the listing shows:
        a finished series needs no look, and the Jobs of its finished tasks are not read again.
        One still receiving is scheduled at once, as fresh work, while the listing goes on; the
        others that need a look wait in the scheduler's background, behind fresh work."""
        self._activations += 1
        # Fingerprints first: a complete series looked at before they are known would be
        # taken for unmatched and deleted.
        fingerprints = self.api.list_fingerprints()
        for body in fingerprints:
            self.fingerprint_event("ADDED", body)
        self.fingerprints.loaded.set()
        # What was known of the Jobs may be stale (their watch was paused): the listing says.
        self.driver.forget_jobs()
        listing = SeriesListing(self.api.series_listing())
        self._watched_while_listing = set()
        try:
            for body in listing.bodies:
                if not self.series_watch.started:
                    # At the first start the watch follows from this listing's version at once (it is
                    # known from the first page on): a series arriving during a long listing is not
                    # held back by it.
                    self.series_watch.start(since=listing.resource_version)
                if body["metadata"]["name"] in self._watched_while_listing:
                    continue  # the watch brought a newer version already
                self._observe(None, body)
                delay = self.driver.triage(body)
                if delay is not None and is_receiving(body):
                    self.scheduler.poke(body["metadata"]["name"], delay, Work.RECEIVING)
                listing.note(body, delay)
        finally:
            self._watched_while_listing = None
        jobs_listing = self.api.jobs_listing()
        for job in jobs_listing:
            series = self.driver.job_listed(job, listing.finished_tasks, listing.running.get(job_series(job)))
            if series:
                self.scheduler.poke(series, work=Work.BACKGROUND)
        for name, delay in listing.background:
            self.scheduler.poke(name, delay, Work.BACKGROUND)
        self._listed = {"series": listing.resource_version, "jobs": jobs_listing.resource_version}
        due = sum(1 for delay in listing.delays if delay <= 0.05)
        log.info("operator %s in namespace %s: %d fingerprints (%d Ready), %d series (%d to look at now, %d later), "
                 "storage %s", "ready" if self._activations == 1 else "resumed", self.settings.namespace,
                 len(fingerprints), len(self.fingerprints.ready()), listing.count, due, len(listing.delays) - due,
                 self.storage.describe())

    def series_event(self, event_type: str | None, body: dict) -> None:
        """A DicomSeries event (None: listed): schedule the series' next look, if it needs one,
        and keep the version for that look. A series still receiving goes first (its next step
        is its dispatch); a change is fresh work; a listed one that was dispatched or finished
        is background work."""
        name = body["metadata"]["name"]
        watched_while_listing = self._watched_while_listing
        if watched_while_listing is not None and event_type is not None:
            watched_while_listing.add(name)
        self._observe(event_type, body)
        if event_type == "DELETED":
            self.scheduler.forget(name)
            self.driver.latest.drop(name)
            return
        delay = self.driver.triage(body)
        if delay is None:
            self.driver.latest.drop(name)
            return
        if event_type is not None and delay <= KEEP_VERSION_FOR:
            self.driver.latest.put(body)
        else:
            self.driver.latest.drop(name)
        work = Work.RECEIVING if is_receiving(body) else Work.FRESH if event_type is not None else Work.BACKGROUND
        self.scheduler.poke(name, delay, work)

    def _observe(self, event_type: str | None, body: dict) -> None:
        for observer in self.series_observers:
            observer(event_type, body["metadata"]["name"], body)

    def job_event(self, event_type: str | None, body: dict) -> None:
        """A Job event (None: listed): its progress into its series, while this operator is active
        (resync() reads every Job when it becomes active)."""
        if event_type == "DELETED":
            self.driver.job_gone(body["metadata"]["name"])
            return
        if not self.active:
            return
        series = self.driver.job_changed(body)
        if series:
            self.scheduler.poke(series)

    def fingerprint_event(self, event_type: str | None, body: dict) -> None:
        if not self.active:
            return  # resync() reads every Fingerprint when this operator becomes active
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.fingerprints.remove(name)
            log.info("fingerprint %s deleted; its running tasks finish as dispatched", name)
            return
        evaluation = evaluate(body, self.api.key_problem)
        self.fingerprints.put(body, evaluation)
        status = ready_status(body, ready_condition(evaluation, body["metadata"].get("generation")), self.clock())
        if status is None:
            return
        try:
            # Not guarded by resourceVersion: the operator is the only writer of these fields.
            self.api.patch_fingerprint_status(name, status)
        except Exception as exc:  # noqa: BLE001 - the next event retries
            log.warning("could not update fingerprint %s status: %s", name, exc)
            return
        if evaluation.ready:
            log.info("fingerprint %s Ready: %s", name, evaluation.message)
        else:
            log.warning("fingerprint %s not Ready (%s): %s", name, evaluation.reason, evaluation.message)
            self.api.event(body, evaluation.reason, evaluation.message, warning=True)


class SeriesListing:
    """What a resync keeps of the DicomSeries it lists (one page of bodies at a time): the tasks
    that finished (their Jobs are not read again), the series with tasks under way (to compare
    their Jobs with), and when each series that is not receiving needs a look."""

    def __init__(self, listing: Listing):
        self._listing = listing
        self.count = 0
        self.finished_tasks: set[str] = set()
        self.running: dict[str, dict] = {}
        self.background: list[tuple[str, float]] = []
        self.delays: list[float] = []

    @property
    def bodies(self):
        return iter(self._listing)

    @property
    def resource_version(self) -> str | None:
        return self._listing.resource_version

    def note(self, body: dict, delay: float | None) -> None:
        self.count += 1
        self.finished_tasks |= finished_task_ids(body)
        if tasks_under_way(body):
            self.running[body["metadata"]["name"]] = body
        if delay is None:
            return
        self.delays.append(delay)
        if not is_receiving(body):
            self.background.append((body["metadata"]["name"], delay))
