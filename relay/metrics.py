"""The relay's Prometheus metrics: their definitions, the calls that count, one endpoint per process.

Every metric of ISDR is defined here, in one registry (REGISTRY), and named `isdr_*`; docs/metrics.md
lists them. The rest of the code calls the small functions below, never prometheus_client itself.

Who counts what:
  * the receiver (in `isdr scp` and `isdr run`): instances and bytes through CountingSink, a wrapper
    around its InstanceSink; refusals and associations where it decides them;
  * the task pipeline: InferenceServer errors through ObservedInferenceClient, delivery errors and
    possible duplicate submits where they happen. In `isdr run` these are served; in `isdr job` (a
    Kubernetes Job's short-lived pod) they are counted but never scraped: that process serves
    nothing, so it writes its error counts into the task's record (errors_counted), and the
    operator adds them to its own counters once (errors_reported);
  * the drivers: tasks started and finished (`isdr run` from its workers, the operator from the
    Jobs it creates and the outcomes it records), series and tasks by phase read at scrape time
    (SeriesCollector), free storage read at scrape time (StorageCollector).

No label carries anything that came from the network or from a patient: label values come from
closed sets (C-STORE status codes, rejection reasons, phases, outcomes, operations) or are
fingerprint names, which an administrator chose and which are checked to be DNS-1123 labels.

Importing this module defines the metrics in REGISTRY and nothing else; serve() starts an HTTP
endpoint (prometheus_client's) for one process, with that process's scrape-time collectors.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from relay import __version__
from relay.endpoint import HttpEndpoint as MetricsEndpoint
from relay.lifecycle import SeriesPhase, TaskPhase

log = logging.getLogger("relay.metrics")

# The relay's own registry, not prometheus_client's global default: what /metrics shows is exactly
# what ISDR defines (plus the standard process_* metrics), whatever a library registers elsewhere.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

# --- closed label sets -----------------------------------------------------------------------

SERIES_PHASES = tuple(str(phase) for phase in SeriesPhase)
TASK_PHASES = tuple(str(phase) for phase in TaskPhase)
OUTCOMES = {str(TaskPhase.SUCCEEDED): "succeeded", str(TaskPhase.FAILED): "failed"}

# Why an association was rejected.
REJECT_CALLING_AE_TITLE = "calling_ae_title"  # not in SCP_ALLOWED_AE_TITLES
REJECT_CALLED_AE_TITLE = "called_ae_title"  # not the relay's AE title
REJECT_ADDRESS = "address"  # not in SCP_ALLOWED_ADDRESSES
REJECT_ASSOCIATION_LIMIT = "association_limit"  # too many associations at once
REJECT_OTHER = "other"
REJECT_REASONS = (REJECT_CALLING_AE_TITLE, REJECT_CALLED_AE_TITLE, REJECT_ADDRESS, REJECT_ASSOCIATION_LIMIT,
                  REJECT_OTHER)

# Requests to an InferenceServer.
INFERENCE_OPERATIONS = ("submit", "poll", "delete")

# Why predictions did not reach a destination.
DELIVERY_UNAVAILABLE = "unavailable"  # no association (refused, unreachable, rejected, aborted)
DELIVERY_REFUSED = "refused"  # the destination answered C-STORE with a failure status
DELIVERY_REASONS = (DELIVERY_UNAVAILABLE, DELIVERY_REFUSED)

# The same errors by kind, as a Kubernetes Job's pod writes them into its task record for the
# operator to count (relay.kube.job_contract): inference_<operation>, delivery_<reason>.
ERROR_KINDS = tuple(f"inference_{operation}" for operation in INFERENCE_OPERATIONS) + tuple(
    f"delivery_{reason}" for reason in DELIVERY_REASONS)

OTHER = "other"
INVALID = "invalid"
_FINGERPRINT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _one_of(value: str, allowed: Iterable[str], fallback: str = OTHER) -> str:
    return value if value in allowed else fallback


def _fingerprint(name: str) -> str:
    """A fingerprint name as a label: it is a DNS-1123 label, or it is not shown."""
    return name if isinstance(name, str) and _FINGERPRINT_NAME.fullmatch(name) else INVALID


def status_label(status: int) -> str:
    """A DIMSE status as four upper-case hex digits, e.g. 0xA700 -> 'A700'."""
    return f"{status:04X}" if isinstance(status, int) and 0 <= status <= 0xFFFF else OTHER


# --- the metrics -----------------------------------------------------------------------------

BUILD = Info("isdr_build", "The relay's version.", registry=REGISTRY)
BUILD.info({"version": __version__})

INSTANCES_RECEIVED = Counter(
    "isdr_instances_received", "Instances stored durably and answered with success (C-STORE 0000).",
    registry=REGISTRY)
RECEIVED_BYTES = Counter(
    "isdr_received_bytes", "Bytes of the instances received, as stored (DICOM file header included).",
    registry=REGISTRY)
INSTANCES_REFUSED = Counter(
    "isdr_instances_refused", "Instances answered with a C-STORE failure status, by status (hex).",
    ["status"], registry=REGISTRY)
ASSOCIATIONS_ACCEPTED = Counter(
    "isdr_associations_accepted", "Associations the receiver accepted.", registry=REGISTRY)
ASSOCIATIONS_REJECTED = Counter(
    "isdr_associations_rejected", "Associations the receiver rejected, by reason.", ["reason"],
    registry=REGISTRY)
TASKS_STARTED = Counter(
    "isdr_tasks_started", "Inference tasks started (isdr run: handed to a worker; operator: Job created).",
    ["fingerprint"], registry=REGISTRY)
TASKS_FINISHED = Counter(
    "isdr_tasks_finished", "Inference tasks finished, by fingerprint and outcome (succeeded, failed).",
    ["fingerprint", "outcome"], registry=REGISTRY)
TASK_DURATION = Histogram(
    "isdr_task_duration_seconds", "Seconds from a task's start (its dispatch) to its end.",
    ["fingerprint", "outcome"], registry=REGISTRY,
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400, float("inf")))
INFERENCE_ERRORS = Counter(
    "isdr_inference_errors", "Failed requests to an InferenceServer (retried or not), by operation.",
    ["operation"], registry=REGISTRY)
DELIVERY_ERRORS = Counter(
    "isdr_delivery_errors", "Failed attempts to store predictions at a destination, by reason.",
    ["reason"], registry=REGISTRY)
POSSIBLE_DUPLICATE_SUBMITS = Counter(
    "isdr_possible_duplicate_submits",
    "Submits sent although an earlier submit of the same task may have reached the InferenceServer.",
    registry=REGISTRY)


# --- the calls the rest of the relay makes ---------------------------------------------------


def instance_received(size: int) -> None:
    INSTANCES_RECEIVED.inc()
    RECEIVED_BYTES.inc(max(0, size))


def instance_refused(status: int) -> None:
    INSTANCES_REFUSED.labels(status_label(status)).inc()


def association_accepted() -> None:
    ASSOCIATIONS_ACCEPTED.inc()


def association_rejected(reason: str) -> None:
    ASSOCIATIONS_REJECTED.labels(_one_of(reason, REJECT_REASONS)).inc()


def reject_reason(source: int, diagnostic: int) -> str:
    """The reason label of an A-ASSOCIATE-RJ by its source and diagnostic (PS3.8 9.3.4)."""
    return {
        (1, 3): REJECT_CALLING_AE_TITLE,  # service user: calling AE title not recognised
        (1, 7): REJECT_CALLED_AE_TITLE,  # service user: called AE title not recognised
        (3, 2): REJECT_ASSOCIATION_LIMIT,  # service provider (presentation): local limit exceeded
    }.get((source, diagnostic), REJECT_OTHER)


def inference_error(operation: str) -> None:
    INFERENCE_ERRORS.labels(_one_of(operation, INFERENCE_OPERATIONS)).inc()


def delivery_error(reason: str) -> None:
    DELIVERY_ERRORS.labels(_one_of(reason, DELIVERY_REASONS)).inc()


def possible_duplicate_submit() -> None:
    POSSIBLE_DUPLICATE_SUBMITS.inc()


def errors_counted() -> dict[str, int]:
    """The InferenceServer and delivery errors this process counted so far, by kind (ERROR_KINDS)."""
    counts = {}
    for operation in INFERENCE_OPERATIONS:
        counts[f"inference_{operation}"] = REGISTRY.get_sample_value(
            "isdr_inference_errors_total", {"operation": operation}) or 0
    for reason in DELIVERY_REASONS:
        counts[f"delivery_{reason}"] = REGISTRY.get_sample_value("isdr_delivery_errors_total", {"reason": reason}) or 0
    return {kind: int(value) for kind, value in counts.items() if value}


def errors_reported(counts: dict[str, int]) -> None:
    """Errors another process counted and reported (a Job's pod, through its task record): the
    operator adds them to its own isdr_inference_errors_total and isdr_delivery_errors_total."""
    for kind, count in counts.items():
        if count <= 0:
            continue
        family, _, label = kind.partition("_")
        if family == "inference" and label in INFERENCE_OPERATIONS:
            INFERENCE_ERRORS.labels(label).inc(count)
        elif family == "delivery" and label in DELIVERY_REASONS:
            DELIVERY_ERRORS.labels(label).inc(count)


class _TaskClock:
    """When this process started each task it has not seen finish (bounded: a task that never
    finishes here, e.g. interrupted by a shutdown, must not grow it forever)."""

    LIMIT = 10_000

    def __init__(self):
        self._lock = threading.Lock()
        self._started: OrderedDict[str, float] = OrderedDict()

    def start(self, task_id: str) -> None:
        with self._lock:
            self._started[task_id] = time.monotonic()
            self._started.move_to_end(task_id)
            while len(self._started) > self.LIMIT:
                self._started.popitem(last=False)

    def stop(self, task_id: str) -> float | None:
        with self._lock:
            started = self._started.pop(task_id, None)
        return None if started is None else time.monotonic() - started


_TASK_CLOCK = _TaskClock()


def task_started(task_id: str, fingerprint: str) -> None:
    fingerprint = _fingerprint(fingerprint)
    TASKS_STARTED.labels(fingerprint).inc()
    for outcome in OUTCOMES.values():  # zero from the start: an alert's increase() sees the first one
        TASKS_FINISHED.labels(fingerprint, outcome)
    _TASK_CLOCK.start(task_id)


def task_finished(task_id: str, fingerprint: str, phase: str, started_at: float | None = None,
                  finished_at: float | None = None) -> None:
    """A task reached `phase`; only Succeeded and Failed count. Its duration is finished_at -
    started_at (epoch seconds) when both are known, else the time since task_started() in this
    process, else unknown (the task is counted, its duration is not)."""
    outcome = OUTCOMES.get(phase)
    since_start = _TASK_CLOCK.stop(task_id)
    if outcome is None:
        return
    labels = (_fingerprint(fingerprint), outcome)
    TASKS_FINISHED.labels(*labels).inc()
    seconds = finished_at - started_at if started_at is not None and finished_at is not None else since_start
    if seconds is not None and seconds >= 0:
        TASK_DURATION.labels(*labels).observe(seconds)


# --- wrappers at the seams -------------------------------------------------------------------


class CountingSink:
    """An InstanceSink that counts what the receiver stored, then tells the real sink."""

    def __init__(self, sink):
        self.sink = sink

    def instance_stored(self, instance) -> None:
        instance_received(instance.size)  # durable and acknowledged, whatever the sink does with it
        self.sink.instance_stored(instance)

    def association_ended(self, calling_ae_title: str) -> None:
        self.sink.association_ended(calling_ae_title)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


class ObservedInferenceClient:
    """An InferenceClient that counts failed requests.

    A poll answered with a transient error (state 'error', or v2's 500 'gone') counts as a failed
    request too. Possible duplicate submits are counted where the one rule that allows them is
    applied (relay.pipeline, after relay.lifecycle.submit_decision said REPEAT), in `isdr run` and
    in a Job alike."""

    def __init__(self, client):
        self.client = client

    def submit(self, archive, model):
        try:
            return self.client.submit(archive, model)
        except Exception:
            inference_error("submit")
            raise

    def poll(self, uid, *args, **kwargs):
        try:
            result = self.client.poll(uid, *args, **kwargs)
        except Exception:
            inference_error("poll")
            raise
        if getattr(result, "state", None) in ("error", "gone"):
            inference_error("poll")
        return result

    def delete(self, uid):
        try:
            return self.client.delete(uid)
        except Exception:
            inference_error("delete")
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


# --- read at scrape time ---------------------------------------------------------------------

SeriesSource = Callable[[], Iterable[tuple[str, Iterable[str]]]]


class SeriesCollector:
    """isdr_series{phase} and isdr_tasks{phase}, counted from what the driver holds when scraped.

    `source()` yields (series phase, phases of its tasks) for every series the driver knows."""

    def __init__(self, source: SeriesSource):
        self.source = source

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("isdr_series", "Series the relay holds, by phase.", labels=["phase"]),
                GaugeMetricFamily("isdr_tasks", "Inference tasks of the series the relay holds, by phase.",
                                  labels=["phase"]))

    def collect(self) -> Iterator[Metric]:
        series = dict.fromkeys(SERIES_PHASES + (OTHER,), 0)
        tasks = dict.fromkeys(TASK_PHASES + (OTHER,), 0)
        for phase, task_phases in self.source():
            series[_one_of(phase, SERIES_PHASES)] += 1
            for task_phase in task_phases:
                tasks[_one_of(task_phase, TASK_PHASES)] += 1
        series_family, task_family = self._families()
        for family, counts in ((series_family, series), (task_family, tasks)):
            for phase, count in counts.items():
                if phase != OTHER or count:
                    family.add_metric([phase], count)
            yield family


class StorageCollector:
    """isdr_storage_free_bytes and isdr_storage_reserve_bytes of a storage, read when scraped.

    Only where the storage can tell (a local disk or volume; an S3 bucket has no such number)."""

    def __init__(self, storage, reserve_bytes: int = 0):
        self.storage = storage
        self.reserve_bytes = reserve_bytes

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("isdr_storage_free_bytes", "Free bytes where instances are stored."),
                GaugeMetricFamily("isdr_storage_reserve_bytes",
                                  "MIN_FREE_BYTES: below this much free space instances are refused (A700)."))

    def collect(self) -> Iterator[Metric]:
        free_family, reserve_family = self._families()
        try:
            free = self.storage.free_bytes()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because storage did
            log.debug("free storage unknown: %s", exc)
            free = None
        if free is not None:
            free_family.add_metric([], free)
            reserve_family.add_metric([], self.reserve_bytes)
        yield free_family
        yield reserve_family


# --- the endpoint ----------------------------------------------------------------------------


def serve(port: int, collectors: Iterable[object] = (), host: str = "0.0.0.0") -> MetricsEndpoint | None:
    """Serve REGISTRY and this process's scrape-time `collectors` at http://host:port/metrics.

    Returns None when port is 0 (metrics off) or the port cannot be bound: the relay's work
    (receiving DICOM above all) goes on without metrics, with an error in the log, and Prometheus
    sees the target down."""
    if not port:
        log.info("metrics off (METRICS_PORT=0)")
        return None
    # A `*_created` series beside every counter would double what Prometheus stores, for nothing
    # the process start time does not already say. (A switch of prometheus_client's, per process.)
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(REGISTRY)
    for collector in collectors:
        registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d (%s): running without metrics", host, port, exc)
        return None
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, port)
    return MetricsEndpoint(server, thread)
