"""What the operator shows of itself: Prometheus metrics, and kopf's logging kept to what matters.

The operator counts tasks where its driver starts and finishes them (relay.metrics calls in
driver.py); this module adds what is read at scrape time (series and tasks by phase, from the
DicomSeries events of the operator's own watch; free storage) and serves the endpoint.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from relay import metrics
from relay.config import Settings
from relay.kube.resources import series_phases

# kopf logs "Handler 'series_event' succeeded." for every watch event of every object and
# "Activity 'scheduler' succeeded." for every liveness probe, at INFO (kopf/_core/actions/
# execution.py, through the per-object logger "kopf.objects" and the activity loggers
# "kopf.activities.<activity>"). These loggers also carry kopf's warnings and errors, which stay.
KOPF_HANDLER_LOGGERS = ("kopf.objects", "kopf.activities.startup", "kopf.activities.cleanup",
                        "kopf.activities.authentication", "kopf.activities.probe")
_SUCCESS = re.compile(r"(Handler|Activity) '[^']*' succeeded\.")


class HandlerSuccessFilter(logging.Filter):
    """Drops kopf's per-handler success lines below WARNING; lets everything else through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _SUCCESS.fullmatch(record.getMessage())


def quiet_kopf_successes() -> None:
    for name in KOPF_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HandlerSuccessFilter) for f in logger.filters):
            logger.addFilter(HandlerSuccessFilter())


class SeriesPhases:
    """The phase of every DicomSeries and of its tasks, as the last watch event showed them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._series: dict[str, tuple[str, tuple[str, ...]]] = {}

    def observe(self, event_type: str | None, name: str, body: dict) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._series.pop(name, None)
                return
            self._series[name] = series_phases(body)

    def snapshot(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        with self._lock:
            return iter(list(self._series.values()))


class ActiveCollector:
    """isdr_operator_active: 1 while this operator is the active one (kopf peering), else 0."""

    def __init__(self, active: Callable[[], bool]):
        self.active = active

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("isdr_operator_active",
                                 "1 while this operator is the active one of its peering, else 0.")

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        family.add_metric([], 1 if self.active() else 0)
        yield family


def while_active(source, active: Callable[[], bool]):
    """`source`, while `active()`; nothing otherwise."""
    return lambda: source() if active() else iter(())


def start(settings: Settings, runtime) -> metrics.MetricsEndpoint | None:
    """Quiet kopf's success lines, follow series phases and serve /metrics on METRICS_PORT.

    Series and tasks by phase are reported by the active operator only: a standby one's view
    may be stale, and two replicas must not count every series twice."""
    quiet_kopf_successes()
    phases = SeriesPhases()
    runtime.series_observers.append(phases.observe)
    return metrics.serve(settings.metrics_port, [
        ActiveCollector(lambda: runtime.active),
        metrics.SeriesCollector(while_active(phases.snapshot, lambda: runtime.active)),
        metrics.StorageCollector(runtime.storage, settings.min_free_bytes),
    ])
