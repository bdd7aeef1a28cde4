"""The InferenceServer client the task pipeline uses: pick the protocol, submit with retries.

The classes and rules live in base.py (shared), http.py (transport), v1.py and v2.py (the two
protocol generations); this module is the entry point and re-exports the public names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from relay.fingerprints.model import InferenceServerRef
from relay.retry import Backoff, retry_call

from .base import (
    ClientSettings,
    InferenceClient,
    InferenceError,
    InvalidTaskUid,
    PollResult,
    ServerUnavailable,
    SubmitRejected,
    TaskFailed,
    validate_uid,
)
from .http import TlsVerificationFailed
from .v1 import V1Client
from .v2 import V2Client

__all__ = [
    "ClientSettings",
    "InferenceClient",
    "InferenceError",
    "InvalidTaskUid",
    "PollResult",
    "ServerUnavailable",
    "SubmitRejected",
    "TaskFailed",
    "TlsVerificationFailed",
    "V1Client",
    "V2Client",
    "make_client",
    "submit_with_retry",
    "validate_uid",
]

log = logging.getLogger(__name__)

# Submits are retried more gently than polls: each attempt uploads the whole series.
SUBMIT_BACKOFF = Backoff(initial=2.0, factor=2.0, maximum=60.0, jitter=0.1)


def make_client(server: InferenceServerRef, settings: ClientSettings, download_dir: Path) -> InferenceClient:
    """A client for the fingerprint's server. A CA bundle on the fingerprint wins over CERT_FILE."""
    if server.ca_bundle:
        settings = replace(settings, ca_bundle=server.ca_bundle)
    if server.protocol == "v1":
        return V1Client(server.url, settings, download_dir)
    if server.protocol == "v2":
        return V2Client(server.url, settings, download_dir)
    raise ValueError(f"unknown InferenceServer protocol {server.protocol!r} (expected v1 or v2)")


def submit_with_retry(
    client: InferenceClient,
    archive: Path,
    model: str,
    *,
    deadline_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[ServerUnavailable, int, float], None] | None = None,
    backoff: Backoff = SUBMIT_BACKOFF,
) -> str:
    """Submit, retrying while the server is unavailable (down, 5xx), for up to `deadline_seconds`.

    SubmitRejected (unknown model, cannot store, 4xx) is raised at once: retrying cannot help.

    Duplicates: v1 and v2 have no idempotency key, so a submit whose answer was lost (the
    response timed out, the connection dropped after the upload: ServerUnavailable with
    `maybe_accepted`) may have created a task we cannot name. The only ways on are to submit
    again (the model may run twice) or to give up (it may never run); this retries, and logs a
    warning. Callers must record their intent to submit *before* calling this and the returned
    uid right after, so that a relay restarted in between sees "submit was in flight" instead of
    silently submitting a second time.
    """

    def report(exc: BaseException, attempt: int, delay: float) -> None:
        if getattr(exc, "maybe_accepted", False):
            log.warning(
                "submit attempt %d may have reached the server before failing (%s); "
                "retrying may run the model twice", attempt, exc,
            )
        if on_retry is not None:
            on_retry(exc, attempt, delay)
        else:
            log.info("submit attempt %d failed (%s), retrying in %.0fs", attempt, exc, delay)

    return retry_call(
        lambda: client.submit(archive, model),
        retry_on=ServerUnavailable,
        deadline=deadline_seconds,
        backoff=backoff,
        sleep=sleep,
        clock=clock,
        on_retry=report,
    )
