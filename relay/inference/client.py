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
    SubmitOutcomeUnknown,
    SubmitRejected,
    TaskFailed,
    redact_url,
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
    "SubmitOutcomeUnknown",
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
# A 500 answer to a submit is the server's own error, and no task was created. The 2.0 server
# gives it for an unknown model (it has no "model not found" code), so it is retried only a few
# times over a few minutes (about 30 s, 60 s, 120 s apart), then the submit is refused.
INTERNAL_ERROR_BACKOFF = Backoff(initial=30.0, factor=2.0, maximum=120.0, jitter=0.1)
MAX_INTERNAL_ERRORS = 4


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
    internal_error_backoff: Backoff = INTERNAL_ERROR_BACKOFF,
    max_internal_errors: int = MAX_INTERNAL_ERRORS,
) -> str:
    """Submit, retrying while the server certainly has no task, for up to `deadline_seconds`.

    Retried: what never reached the server (connection refused, DNS, connect timeout, an upload
    that broke off) and answers that mean no task exists (502, 503, 408, 429; 500 only
    `max_internal_errors` times, then SubmitRejected naming the model and the server).
    Raised at once: SubmitRejected (unknown model, cannot store, 4xx, a redirect), and
    SubmitOutcomeUnknown: the upload reached the server and its answer did not come back, so the
    task may exist. v1 and v2 have no idempotency key, so this function never repeats such a
    submit itself: repeating it may run the model twice, and only the caller knows whether it
    already did (the life cycle allows one repeat, flagged as a possible duplicate). Callers
    record their intent to submit *before* calling this and the returned uid right after.
    """
    started = clock()
    internal_errors = 0

    def schedule(exc: ServerUnavailable) -> Backoff:
        nonlocal internal_errors
        if isinstance(exc, SubmitOutcomeUnknown):
            raise exc
        if exc.maybe_accepted:  # a client that does not say SubmitOutcomeUnknown itself
            raise SubmitOutcomeUnknown(str(exc), exc.status_code) from exc
        if exc.status_code != 500:
            return backoff
        internal_errors += 1
        if internal_errors >= max_internal_errors:
            raise _internal_errors(client, model, internal_errors, clock() - started, exc) from exc
        return internal_error_backoff

    def report(exc: BaseException, attempt: int, delay: float) -> None:
        if on_retry is not None:
            on_retry(exc, attempt, delay)
        else:
            log.info("submit attempt %d failed (%s), retrying in %.0fs", attempt, exc, delay)

    return retry_call(
        lambda: client.submit(archive, model),
        retry_on=ServerUnavailable,
        deadline=deadline_seconds,
        backoff=backoff,
        schedule=schedule,
        sleep=sleep,
        clock=clock,
        on_retry=report,
    )


def _internal_errors(client: InferenceClient, model: str, count: int, elapsed: float,
                     last: ServerUnavailable) -> SubmitRejected:
    server = redact_url(client.url)
    hint = (" InferenceServer 2.0 answers 500 to a submit for a model it does not know: check that "
            f"model {model!r} exists there." if client.protocol == "v2" else "")
    return SubmitRejected(
        f"model {model!r} at {server} ({client.protocol}): the server answered {count} submits with "
        f"HTTP 500 over {elapsed:.0f}s; giving up.{hint} Last answer: {last}",
        500,
    )
