"""Every call ISDR makes to the Kubernetes API, and the one family of errors they raise.

The receiver's publisher and the operator both call through KubeApi (one namespace, the
official client underneath); whatever goes wrong comes out as one of these exceptions, the way
kopf keeps its API errors in one place (kopf/_cogs/clients/errors.py):

    ApiError              any failure of a call (`status`: the HTTP status, 0 if none came)
    ├── ApiUnavailable    transient: refused, reset, timed out, 5xx, 429; retry with backoff
    ├── NotFound          404: the object (or the resource type: no CRD) is not there
    ├── Conflict          409: the object changed since it was read (a stale resourceVersion)
    │   └── AlreadyExists 409 on a create: someone created it first
    ├── Expired           410: a watch's resourceVersion is too old: list again
    └── Rejected          any other 4xx: retrying at once will not help (400, 422, ...)
        └── Forbidden     401, 403: the service account may not (check the RBAC rules)

The retry policy lives here too: how long one call may take (REQUEST_TIMEOUT, RECEIVER_TIMEOUT), how often a
read-decide-write is tried again after a Conflict (CONFLICT_ATTEMPTS), and the backoff while the
API is unavailable (outage_backoff). What the objects mean is relay.kube.resources'.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Iterator

from relay.kube.resources import (
    FINGERPRINT_PLURAL,
    GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PEERING_GROUP,
    PEERING_PLURAL,
    PEERING_VERSION,
    SERIES_PLURAL,
    VERSION,
    event,
    peering_status,
)
from relay.retry import Backoff

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # seconds for each call of the operator
# The receiver's publication thread waits less on each call: (connect, read) seconds.
RECEIVER_TIMEOUT = (5.0, 15.0)
CONFLICT_ATTEMPTS = 5  # read, decide, write guarded by resourceVersion: tries before giving up
# Objects per page of a listing: thousands of DicomSeries or Jobs are read a page at a time, so
# that no more than one page is held at once.
LIST_PAGE = 500
# A watch ends on the server side after this many seconds and is started again from where it was,
# so that a connection that died silently (a NAT timeout, an API server restart) is noticed.
WATCH_SECONDS = 300
MERGE_PATCH = "application/merge-patch+json"


def outage_backoff() -> Backoff:
    """Delays between attempts while the API is unavailable: 1 s doubling up to 30 s."""
    return Backoff(initial=1.0, factor=2.0, maximum=30.0)


# --- the errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """A Kubernetes API call failed."""

    def __init__(self, reason: str, status: int = 0):
        self.status = status
        self.reason = reason
        super().__init__(reason)


class ApiUnavailable(ApiError):
    """A transient failure: connection refused or reset, timeout, 5xx, 429. Retried with backoff."""


class NotFound(ApiError):
    """404: the object was deleted (or never was), or the resource type is not served."""


class Conflict(ApiError):
    """409 on an update: the object changed since we read it."""


class AlreadyExists(Conflict):
    """409 on a create: another process created the object first."""


class Expired(ApiError):
    """410 Gone: the resourceVersion a watch started from is too old; list again."""


class Rejected(ApiError):
    """The API answered with an error that retrying at once will not fix (400, 422, ...)."""

    def __init__(self, reason: str, status: int = 0):
        super().__init__(f"HTTP {status}: {reason}", status)


class Forbidden(Rejected):
    """401 or 403: the service account is not allowed to."""


def error_for(status: int, reason: str) -> ApiError:
    """The exception for an HTTP error status (0: the client failed before getting one)."""
    if status == 404:
        return NotFound(reason, status)
    if status == 409:
        return Conflict(reason, status)
    if status == 410:
        return Expired(reason, status)
    if status == 0 or status == 429 or status >= 500:
        return ApiUnavailable(f"HTTP {status}: {reason}" if status else reason, status)
    if status in (401, 403):
        return Forbidden(reason, status)
    return Rejected(reason, status)


def _message(exc) -> str:
    """The Status message the API server sent (say, which field is invalid), else the reason."""
    try:
        message = json.loads(exc.body).get("message") if exc.body else None
    except (ValueError, TypeError, AttributeError):
        message = None
    text = message or exc.reason or ""
    return text if len(text) <= 500 else text[:500] + "..."


def call(method, *args, timeout=REQUEST_TIMEOUT, **kwargs):
    """`method(*args, **kwargs)` of the official client, bounded by `timeout`; errors as ApiError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return method(*args, _request_timeout=timeout, **kwargs)
    except ApiException as exc:
        raise error_for(exc.status or 0, _message(exc)) from None
    except (HTTPError, OSError) as exc:  # refused, reset, timed out, TLS handshake cut short
        raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from None


# --- the calls -----------------------------------------------------------------------------------

JOBS_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


class Listing:
    """Every item of a listing, read a page (LIST_PAGE) at a time as it is iterated:
    `read_page(continue_token)` returns one page as a dict. Once iterated, `resource_version` is
    the listing's version, the one to watch from."""

    def __init__(self, read_page):
        self._read_page = read_page
        self.resource_version: str | None = None

    def __iter__(self) -> Iterator[dict]:
        token = None
        while True:
            page = self._read_page(token)
            metadata = page.get("metadata") or {}
            if self.resource_version is None:
                self.resource_version = metadata.get("resourceVersion")
            yield from page["items"]
            token = metadata.get("continue")
            if not token:
                return


class KubeApi:
    """ISDR's objects in one namespace: DicomSeries, Fingerprints, Jobs, Events, kopf's peering."""

    def __init__(self, api_client, namespace: str, *, component: str = "isdr-operator", timeout=REQUEST_TIMEOUT):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.component = component
        self.host = socket.gethostname()
        self.timeout = timeout

    def _call(self, method, *args, **kwargs):
        return call(method, *args, timeout=self.timeout, **kwargs)

    # --- custom objects of group isdr.io ---

    def _get(self, plural: str, name: str, group: str = GROUP, version: str = VERSION) -> dict | None:
        try:
            return self._call(self.custom.get_namespaced_custom_object, group, version, self.namespace, plural,
                              name)
        except NotFound:
            return None

    def _list(self, plural: str, **kwargs) -> list[dict]:
        return self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, plural,
                          **kwargs)["items"]

    def _watch(self, method, *args, since: str, **kwargs) -> Iterator[tuple[str, dict]]:
        """(event type, object) from resourceVersion `since` on, until the server ends the watch
        (WATCH_SECONDS). BOOKMARK events carry only the version reached."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        stream = watch.Watch()
        try:
            # (deserialize=False would spare making models of Jobs, but the client then fails on
            # the ERROR event that says the version expired, instead of raising a 410.)
            for event in stream.stream(method, *args, resource_version=since, timeout_seconds=WATCH_SECONDS,
                                       allow_watch_bookmarks=True,
                                       _request_timeout=(self.timeout, WATCH_SECONDS + self.timeout), **kwargs):
                yield event["type"], event["raw_object"]
        except ApiException as exc:
            raise error_for(exc.status or 0, _message(exc)) from None
        except (HTTPError, OSError, ValueError) as exc:  # cut short, or a line that is not JSON
            raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            stream.stop()

    def _patch_status(self, plural: str, name: str, status: dict, resource_version: str | None) -> dict:
        """Merge `status` in; with `resource_version`, only if the object is still that version
        (else Conflict, or NotFound when it is gone)."""
        patch: dict = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        return self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, self.namespace,
                          plural, name, patch, _content_type=MERGE_PATCH)

    # --- DicomSeries ---

    def get_series(self, name: str) -> dict | None:
        return self._get(SERIES_PLURAL, name)

    def series_listing(self) -> "Listing":
        """Every DicomSeries, read a page at a time."""
        return Listing(lambda token: self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, SERIES_PLURAL,
            limit=LIST_PAGE, **({"_continue": token} if token else {})))

    def watch_series(self, since: str) -> Iterator[tuple[str, dict]]:
        return self._watch(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                           SERIES_PLURAL, since=since)

    def list_series(self, label_selector: str) -> list[dict]:
        """The DicomSeries with this label selector (a study's few series), in one request."""
        return self._list(SERIES_PLURAL, label_selector=label_selector)

    def can_list_series(self) -> None:
        """A cheap probe: raises unless DicomSeries can be listed here (CRD installed, RBAC)."""
        self._list(SERIES_PLURAL, limit=1)

    def create_series(self, body: dict) -> dict:
        try:
            return self._call(self.custom.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              SERIES_PLURAL, body)
        except Conflict as exc:
            raise AlreadyExists(body["metadata"]["name"], exc.status) from None

    def patch_series_status(self, name: str, status: dict, resource_version: str | None = None) -> dict:
        return self._patch_status(SERIES_PLURAL, name, status, resource_version)

    def delete_series(self, name: str, resource_version: str) -> None:
        """Delete it if it is still that version (else Conflict); gone already is fine."""
        from kubernetes import client

        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=resource_version))
        try:
            self._call(self.custom.delete_namespaced_custom_object, GROUP, VERSION, self.namespace,
                       SERIES_PLURAL, name, body=options)
        except NotFound:
            pass

    # --- Fingerprints ---

    def list_fingerprints(self) -> list[dict]:
        return self._list(FINGERPRINT_PLURAL)

    def get_fingerprint(self, name: str) -> dict | None:
        return self._get(FINGERPRINT_PLURAL, name)

    def patch_fingerprint_status(self, name: str, status: dict, resource_version: str | None = None) -> dict:
        return self._patch_status(FINGERPRINT_PLURAL, name, status, resource_version)

    # --- ConfigMaps and Secrets a Fingerprint refers to ---

    def key_problem(self, kind: str, name: str, key: str) -> str | None:
        """What is wrong with a ConfigMap/Secret key reference (None: it resolves)."""
        read = self.core.read_namespaced_config_map if kind == "ConfigMap" else self.core.read_namespaced_secret
        try:
            obj = self._call(read, name, self.namespace)
        except NotFound:
            return f"{kind} {name} not found in namespace {self.namespace}"
        data = {**(obj.data or {}), **(getattr(obj, "binary_data", None) or {})}
        if key not in data:
            return f"{kind} {name} has no key {key!r}"
        return None

    def key_text(self, kind: str, name: str, key: str) -> str:
        """The text under `key` of a ConfigMap or Secret (NotFound when it or the key is missing)."""
        import base64

        read = self.core.read_namespaced_config_map if kind == "ConfigMap" else self.core.read_namespaced_secret
        obj = self._call(read, name, self.namespace)
        if kind == "ConfigMap" and key in (obj.data or {}):
            return obj.data[key]
        encoded = (obj.data or {}).get(key) if kind == "Secret" else (obj.binary_data or {}).get(key)
        if encoded is None:
            raise NotFound(f"{kind} {name} has no key {key!r}", 404)
        return base64.b64decode(encoded).decode()

    # --- Jobs ---

    def jobs_listing(self) -> "Listing":
        """The Jobs the operator made (label app.kubernetes.io/managed-by), as plain dicts, read a
        page at a time."""
        def page(token):
            response = self._call(self.batch.list_namespaced_job, self.namespace, label_selector=JOBS_SELECTOR,
                                  limit=LIST_PAGE, _preload_content=False, **({"_continue": token} if token else {}))
            return json.loads(response.data)

        return Listing(page)

    def watch_jobs(self, since: str) -> Iterator[tuple[str, dict]]:
        return self._watch(self.batch.list_namespaced_job, self.namespace, label_selector=JOBS_SELECTOR, since=since)

    def job_exists(self, name: str) -> bool:
        try:
            self._call(self.batch.read_namespaced_job, name, self.namespace)
            return True
        except NotFound:
            return False

    def create_job(self, job: dict) -> bool:
        """True if created, False if it existed already (a re-dispatch after a restart)."""
        try:
            self._call(self.batch.create_namespaced_job, self.namespace, job)
            return True
        except Conflict:
            return False

    def delete_job(self, name: str) -> bool:
        """Delete a Job and (in the background) its pods; False when it was gone already."""
        try:
            self._call(self.batch.delete_namespaced_job, name, self.namespace, propagation_policy="Background")
            return True
        except NotFound:
            return False

    # --- kopf's peering ---

    def get_peering_status(self, name: str) -> dict | None:
        """The status of the KopfPeering `name` ({} when empty), None when it does not exist."""
        return peering_status(self._get(PEERING_PLURAL, name, PEERING_GROUP, PEERING_VERSION))

    # --- Events ---

    def event(self, body: dict, reason: str, message: str, warning: bool = False, now: float | None = None) -> None:
        """Post an Event on `body` (stamped `now`, default: now); failures are logged, never
        raised (events are best effort)."""
        try:
            self._call(self.core.create_namespaced_event, self.namespace,
                       event(body, self.namespace, reason, message, warning=warning, component=self.component,
                             host=self.host, now=time.time() if now is None else now))
        except Exception as exc:  # noqa: BLE001 - an event is never worth failing a step for
            log.warning("could not post event %s on %s: %s", reason, body["metadata"]["name"], exc)
