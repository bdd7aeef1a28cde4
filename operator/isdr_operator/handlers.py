"""kopf handlers: thin, they only route Fingerprint events, start-up, clean-up and the probe.

DicomSeries and Jobs are watched by the operator itself (isdr_operator.watching): at start-up
kopf would handle each of thousands of objects at length before one arriving meanwhile. Only
event handlers are used (no change handlers, daemons or timers): kopf then stores nothing on the
objects and adds no finalizer, so nothing blocks the deletion of a Fingerprint or DicomSeries
while the operator is down. kopf's peering pauses the Fingerprint watch; the operator's own
peering gate (isdr_operator.peering) holds back everything else it does.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from relay.kube.resources import FINGERPRINT_PLURAL, GROUP, VERSION

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
    return RUNTIME.health(stuck_after=STUCK_AFTER_SECONDS)


@kopf.on.event(GROUP, VERSION, FINGERPRINT_PLURAL)
async def fingerprint_event(type, body, **_) -> None:  # noqa: A002 - kopf's keyword
    await asyncio.to_thread(RUNTIME.fingerprint_event, type, dict(body))
