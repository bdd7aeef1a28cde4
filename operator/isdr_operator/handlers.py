"""kopf handlers: thin, they only route watch events to the driver and the scheduler.

Only event handlers are used (no change handlers, daemons or timers): kopf then stores nothing on
the objects and adds no finalizer, so nothing blocks the deletion of a Fingerprint or DicomSeries
while the operator is down. kopf's peering pauses these handlers' watch streams; the operator's
own peering gate (isdr_operator.peering) holds back everything else it does.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from relay.kube.resources import FINGERPRINT_PLURAL, GROUP, LABEL_MANAGED_BY, MANAGED_BY, SERIES_PLURAL, VERSION

from isdr_operator.runtime import Runtime

log = logging.getLogger("isdr_operator")

# Set by isdr_operator.command before kopf starts.
RUNTIME: Runtime | None = None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.scanning.disabled = True  # namespaced: no cluster-wide CRD listing (no ClusterRole)
    # Watches end and restart on the server side every few minutes, so that a connection that
    # died silently (a NAT timeout, an API server restart) is noticed.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.enabled = False  # the driver posts its own Events, with reasons
    settings.persistence.finalizer = "isdr.io/operator"  # never added: no deletion handlers
    await asyncio.to_thread(RUNTIME.start)


@kopf.on.cleanup()
async def shutdown(**_) -> None:
    await asyncio.to_thread(RUNTIME.stop)


# A step waits on the API server and on storage, each with its own timeouts; one that runs this
# long means the operator is wedged, and a restart (liveness probe) is the way out.
STUCK_AFTER_SECONDS = 600.0


@kopf.on.probe(id="scheduler")
def scheduler_health(**_) -> dict:
    """Served at --liveness (the chart's livenessProbe); raising makes the probe fail."""
    return RUNTIME.scheduler.health(stuck_after=STUCK_AFTER_SECONDS)


@kopf.on.event(GROUP, VERSION, FINGERPRINT_PLURAL)
async def fingerprint_event(type, body, **_) -> None:  # noqa: A002 - kopf's keyword
    await asyncio.to_thread(RUNTIME.fingerprint_event, type, dict(body))


@kopf.on.event(GROUP, VERSION, SERIES_PLURAL)
async def series_event(type, body, **_) -> None:  # noqa: A002
    # Only scheduling, from the watched object alone (no API call, in the event loop: thousands
    # of them at start-up cost no thread hop each); the scheduler steps while this operator is
    # the active one.
    RUNTIME.series_event(type, dict(body))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def job_event(type, body, name, **_) -> None:  # noqa: A002
    if type == "DELETED":
        RUNTIME.driver.job_gone(name)
        return
    if not RUNTIME.active:
        return  # while paused: Runtime.resync() reads every Job when this operator becomes active
    series = await asyncio.to_thread(RUNTIME.driver.job_changed, dict(body))
    if series:
        RUNTIME.scheduler.poke(series)
