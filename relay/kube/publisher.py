"""Publishes what the receiver stored as `DicomSeries` custom resources (the receiver's Kubernetes side).

The receiver calls `instance_stored` on its association threads once an instance is durable. That
only notes the series in memory (a lock, a dict): it never waits for the API and never raises, so
an API outage cannot make the receiver refuse or lose an instance. A background thread publishes:

- each series that received instances at most once per `min_interval` (1 s), plus once right after
  an association that touched it ended, whatever the instance rate;
- one publication = GET the DicomSeries; CREATE it if missing (spec: identity, the attributes
  matching needs, where the instances are); then merge-patch the receiver's status fields with the
  object's resourceVersion as a precondition (optimistic concurrency, 409 -> read again);
- `status.instances` is the number of instance objects in storage under the series' prefix,
  counted after the read: several replicas and re-sent instances still give the right number, and
  a replica can never overwrite a newer count with an older one (it would get 409);
- firstReceived = min, lastReceived = max, receivedBy = union (capped); phase only for an object
  that has none yet. The operator's fields (phase, tasks, generation, ...) are never written.

API outages (connection errors, timeouts, 5xx, 429) keep the series pending and are retried with
backoff; one warning per outage, one info line when publication recovers. No patient data is read
here: the spec carries UIDs, the four matching attributes and the storage location only.

What the object says is relay.kube.resources' (new_series, received_status); the calls and their
errors are relay.kube.api's. This module is the thread and its timing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from relay.config import Settings
from relay.dicom.identity import identify_part10
from relay.dicom.receiver import ReceivedInstance
from relay.fingerprints.model import SeriesAttributes
from relay.kube.api import (
    CONFLICT_ATTEMPTS,
    AlreadyExists,
    ApiError,
    ApiUnavailable,
    Conflict,
    NotFound,
    outage_backoff,
)
from relay.kube.resources import (
    earliest,
    latest,
    new_series,
    published,
    received_status,
    resource_name,
    storage_location,
)
from relay.retry import Backoff
from relay.storage.base import Storage, StorageError
from relay.storage.instances import stored_instances, stored_series
from relay.uids import SeriesKey

log = logging.getLogger("relay.kube.publisher")

_FORGET_AFTER = 300.0  # seconds a published, quiet series stays in memory (for the rate limit)


class PublishError(Exception):
    """Publishing one series failed for a reason of its own; it is retried with backoff."""


class SeriesApi(Protocol):
    """The calls the publisher makes (relay.kube.api.KubeApi; a fake one in the unit tests)."""

    def get_series(self, name: str) -> dict | None: ...

    def create_series(self, body: dict) -> dict: ...

    def patch_series_status(self, name: str, status: dict, resource_version: str | None = None) -> dict: ...


def count_instances(storage: Storage, key: SeriesKey) -> int:
    """Instance objects stored under the series' prefix (temporary and foreign files excluded)."""
    return len(stored_instances(storage, key)[0])


def _printable(text: str, limit: int = 32) -> str:
    """Free text from the network, safe for one log line."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned or "?"


def default_pod_name(environ=None) -> str:
    environ = os.environ if environ is None else environ
    return (environ.get("POD_NAME") or "").strip() or socket.gethostname()


# --------------------------------------------------------------------------------------------------
# The publisher


@dataclass
class _Series:
    """What this process knows about one series and has not published yet."""

    key: SeriesKey
    study_uid: str | None
    attributes: SeriesAttributes
    first: float | None = None  # received_at window not yet published (wall clock)
    last: float | None = None
    dirty: bool = False
    urgent: bool = False  # an association that touched it ended
    last_write: float = float("-inf")  # monotonic time of the latest publication attempt
    last_urgent_write: float = float("-inf")
    retry_at: float = float("-inf")  # per-series backoff after a non-transient failure
    failures: int = 0
    touched: float = 0.0  # monotonic time of the latest instance (to forget quiet series)

    def take(self) -> tuple[float | None, float | None]:
        window = (self.first, self.last)
        self.first = self.last = None
        self.dirty = self.urgent = False
        return window

    def give_back(self, first: float | None, last: float | None) -> None:
        self.first = earliest(self.first, first)
        self.last = latest(self.last, last)
        self.dirty = True


class _Outage(Exception):
    pass


@dataclass
class FlushResult:
    published: int = 0
    pending: int = 0
    outage: bool = False
    errors: list[str] = field(default_factory=list)


class SeriesPublisher:
    """InstanceSink that keeps one DicomSeries per received series up to date (see the module doc)."""

    def __init__(self, api: SeriesApi, storage: Storage, settings: Settings, *, pod_name: str | None = None,
                 min_interval: float = 1.0, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic, namespace: str = ""):
        self.api = api
        self.storage = storage
        self.settings = settings
        self.pod_name = pod_name or default_pod_name()
        self.min_interval = min_interval
        self.backoff = backoff or outage_backoff()
        self.clock = clock
        self.namespace = namespace
        self._series: dict[SeriesKey, _Series] = {}
        self._by_caller: dict[str, set[SeriesKey]] = {}
        self._lock = threading.Lock()  # guards _series and _by_caller; never held during I/O
        self._flush_lock = threading.Lock()  # one publication round at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Outage bookkeeping (only touched under _flush_lock).
        self._outage_since: float | None = None
        self._outage_attempts = 0
        self._outage_retry_at = float("-inf")
        self.writes = 0  # API writes done (creates + status patches), for tests and metrics

    # --- InstanceSink (association threads: fast, never raises, never blocks on the API) ---

    def instance_stored(self, instance: ReceivedInstance) -> None:
        identity = instance.identity
        key = identity.series
        now = self.clock()
        with self._lock:
            entry = self._series.get(key)
            if entry is None:
                entry = self._series[key] = _Series(key, identity.study_uid, identity.attributes)
            elif entry.study_uid is None and identity.study_uid:
                entry.study_uid = identity.study_uid
            entry.first = earliest(entry.first, instance.received_at)
            entry.last = latest(entry.last, instance.received_at)
            entry.touched = now
            newly_dirty = not entry.dirty
            entry.dirty = True
            self._by_caller.setdefault(instance.calling_ae_title, set()).add(key)
        if newly_dirty:
            self._wake.set()

    def association_ended(self, calling_ae_title: str) -> None:
        with self._lock:
            keys = self._by_caller.pop(calling_ae_title, set())
            for key in keys:
                entry = self._series.get(key)
                if entry is not None and entry.dirty:
                    entry.urgent = True
        if keys:
            self._wake.set()

    # --- life cycle ---

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="series-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the background thread and publish what is pending (trying for up to `timeout` s).

        Returns True when nothing is left unpublished."""
        deadline = time.monotonic() + timeout  # real time, whatever clock the rate limit uses
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A round in progress ends with its API call (bounded by relay.kube.api.RECEIVER_TIMEOUT); flush() below
            # waits for it anyway.
            self._thread.join(timeout=max(timeout, 0.1))
            self._thread = None
        while True:
            result = self.flush()
            if not result.pending:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                keys = self.pending_series()
                log.warning("stopping with %d series not published (their instances are in storage): %s",
                            len(keys), ", ".join(k.series_uid for k in keys[:10]))
                return False
            time.sleep(min(remaining, 1.0))

    def flush(self) -> FlushResult:
        """Publish every pending series now, ignoring the rate limit and any outage backoff.
        Synchronous; safe from any thread (publication rounds take turns)."""
        return self._round(force=True)

    def publish_due(self) -> FlushResult:
        """One round of the background thread: publish the series whose turn it is (rate limit,
        association ends, backoff after failures). Public so that tests can drive it with a clock."""
        return self._round(force=False)

    def pending_series(self) -> list[SeriesKey]:
        with self._lock:
            return sorted(key for key, entry in self._series.items() if entry.dirty)

    # --- the background thread ---

    def recover_unpublished(self) -> int:
        """Publish what storage holds and the DicomSeries do not say (storage is the truth).

        A receiver killed between storing an instance (and acknowledging it) and publishing its
        series would otherwise leave it unseen by the operator: a series with no object at all,
        or an object whose count and last arrival are behind what is stored (a series published
        at 2 of 20 instances). Both are published again from storage; the operator then decides
        what the instances it did not know of mean (a series still arriving, or arrivals after
        its dispatch). Raises ApiUnavailable during an outage."""
        recovered = reconciled = 0
        for key, (uids, newest, sample_key) in stored_series(self.storage).items():
            with self._lock:
                if key in self._series:
                    continue
            body = self.api.get_series(resource_name(key))
            counts = published(body)
            if counts is not None:
                instances, published_last = counts
                # (lastReceived is written to the microsecond; a file's time is finer)
                if instances == len(uids) and (published_last or 0.0) >= newest - 0.001:
                    continue
            try:
                identity = identify_part10(self.storage.get(sample_key))
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
                log.error("series %s is in storage but unreadable: %s", key.series_uid, exc)
                continue
            self.instance_stored(ReceivedInstance(identity=identity, size=0, calling_ae_title="",
                                                  received_at=newest))
            if body is None:
                recovered += 1
            else:
                reconciled += 1
        if recovered:
            log.warning("found %d series in storage that were never published (a receiver stopped "
                        "before it could); publishing them now", recovered)
        if reconciled:
            log.warning("found %d series whose DicomSeries is behind what is stored (a receiver stopped "
                        "before it could publish the last instances); publishing them again", reconciled)
        return recovered + reconciled

    def _run(self) -> None:
        recovered = False
        while not self._stop.is_set() and not recovered:
            try:
                self.recover_unpublished()
                recovered = True
            except (ApiError, PublishError) as exc:
                log.warning("cannot look for unpublished series yet: %s", exc)
                self._stop.wait(5.0)
            except Exception:
                log.exception("looking for unpublished series failed")
                recovered = True
        while not self._stop.is_set():
            self._wake.clear()  # before the round: a wake-up during it is not lost
            try:
                self.publish_due()
            except Exception:  # the publisher must outlive any one bad series
                log.exception("publishing DicomSeries failed")
            self._wake.wait(self._next_wait())

    def _next_wait(self) -> float:
        """Seconds until something may be due (bounded, so that a missed wake-up costs little)."""
        now = self.clock()
        wait = 1.0
        with self._lock:
            for entry in self._series.values():
                if entry.dirty:
                    due = max(entry.retry_at, self._outage_retry_at,
                              min(entry.last_write, entry.last_urgent_write if entry.urgent else entry.last_write)
                              + self.min_interval)
                    wait = min(wait, due - now)
        return max(wait, 0.01)

    def _due(self, force: bool, now: float) -> list[tuple[_Series, tuple[float | None, float | None]]]:
        """Take the series to publish now; each is marked clean (and given back if publishing fails)."""
        taken = []
        with self._lock:
            for key in sorted(self._series):
                entry = self._series[key]
                if not entry.dirty:
                    if now - max(entry.last_write, entry.touched) > _FORGET_AFTER:
                        del self._series[key]
                    continue
                if force:
                    pass
                elif now < entry.retry_at:
                    continue
                elif now - entry.last_write >= self.min_interval:
                    pass
                elif entry.urgent and now - entry.last_urgent_write >= self.min_interval:
                    entry.last_urgent_write = now
                else:
                    continue
                entry.last_write = now
                taken.append((entry, entry.take()))
        return taken

    def _round(self, force: bool) -> FlushResult:
        result = FlushResult()
        with self._flush_lock:
            now = self.clock()
            if not force and now < self._outage_retry_at:
                result.outage = True
                result.pending = len(self.pending_series())
                return result
            taken = self._due(force, now)
            for index, (entry, window) in enumerate(taken):
                try:
                    self._publish(entry, *window)
                except _Outage as exc:
                    self._give_back(taken[index:])
                    self._note_outage(str(exc)[:300])
                    result.outage = True
                    break
                except Exception as exc:  # noqa: BLE001 - this series waits, the others go on
                    self._give_back([(entry, window)])
                    self._note_failure(entry, exc)
                    result.errors.append(f"{entry.key.series_uid}: {exc}")
                else:
                    entry.failures = 0
                    entry.retry_at = float("-inf")
                    result.published += 1
                    self._note_success()
        result.pending = len(self.pending_series())
        return result

    def _give_back(self, items) -> None:
        with self._lock:
            for entry, (first, last) in items:
                entry.give_back(first, last)

    # --- outages and failures ---

    def _note_outage(self, reason: str) -> None:
        now = self.clock()
        if self._outage_since is None:
            self._outage_since = now
            log.warning("cannot reach the Kubernetes API (%s): DicomSeries publication is delayed; "
                        "instances are still received and stored", reason)
        delay = self.backoff.delay(self._outage_attempts)
        self._outage_attempts += 1
        self._outage_retry_at = now + delay
        log.debug("Kubernetes API unavailable (%s); retrying in %.1fs", reason, delay)

    def _note_success(self) -> None:
        if self._outage_since is not None:
            log.info("the Kubernetes API is reachable again after %.0fs: DicomSeries publication resumed",
                     self.clock() - self._outage_since)
        self._outage_since = None
        self._outage_attempts = 0
        self._outage_retry_at = float("-inf")

    def _note_failure(self, entry: _Series, exc: Exception) -> None:
        delay = self.backoff.delay(entry.failures)
        entry.failures += 1
        entry.retry_at = self.clock() + delay
        if isinstance(exc, _BeingDeleted):
            if entry.failures == 1:
                log.info("series %s: its DicomSeries is being deleted; it is created again once gone",
                         entry.key.series_uid)
            return
        log.error("series %s: cannot publish its DicomSeries (retrying in %.0fs): %s",
                  entry.key.series_uid, delay, exc)

    # --- one series ---

    def _publish(self, entry: _Series, first: float | None, last: float | None) -> None:
        name = resource_name(entry.key)
        created = False
        try:
            for _attempt in range(CONFLICT_ATTEMPTS):
                body = self.api.get_series(name)
                if body is None:
                    try:
                        body = self.api.create_series(new_series(
                            entry.key, entry.study_uid, entry.attributes, storage_location(self.settings, entry.key)))
                    except AlreadyExists:
                        continue  # another replica was first: read theirs
                    created = True  # stays True if the status patch below must be retried
                    self.writes += 1
                elif (body.get("metadata") or {}).get("deletionTimestamp"):
                    raise _BeingDeleted(name)
                # Counted after the read: a replica that published a larger count before our read
                # counted before we do, and one that publishes after our read makes our patch fail.
                instances = count_instances(self.storage, entry.key)
                patch = received_status(body, instances=instances, first_received=first, last_received=last,
                                        pod_name=self.pod_name)
                if patch:
                    try:
                        self.api.patch_series_status(name, patch, body["metadata"]["resourceVersion"])
                    except (Conflict, NotFound):
                        continue  # changed or deleted since we read it: read again
                    self.writes += 1
                if created or published(body) is None:  # the first publication of the series
                    log.info("published series %s (modality %s, %d instances) as DicomSeries %s%s",
                             entry.key.series_uid, _printable(entry.attributes.modality), instances,
                             f"{self.namespace}/" if self.namespace else "", name)
                elif patch:
                    log.debug("series %s: DicomSeries %s updated (%s; %d instances)", entry.key.series_uid,
                              name, ", ".join(sorted(patch)), instances)
                else:
                    log.debug("series %s: DicomSeries %s already up to date (%d instances)",
                              entry.key.series_uid, name, instances)
                return
        except ApiUnavailable as exc:
            raise _Outage(str(exc)) from exc
        except StorageError as exc:
            raise PublishError(f"cannot count the stored instances: {exc}") from exc
        raise PublishError(f"DicomSeries {name} kept changing ({CONFLICT_ATTEMPTS} conflicts in a row)")


class _BeingDeleted(Exception):
    def __str__(self) -> str:
        return f"DicomSeries {self.args[0]} is being deleted"
