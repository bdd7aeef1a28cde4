"""The few API calls the operator makes, with errors translated to the relay's exceptions."""

from __future__ import annotations

import json
import logging
import socket
import time

from relay.kube.publisher import AlreadyExists, ApiUnavailable, Conflict, NotFound, translate_status
from relay.kube.publisher import _api_message as api_message
from relay.kube.series_resource import GROUP, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION, to_rfc3339

log = logging.getLogger("isdr_operator.api")

MERGE = "application/merge-patch+json"
TIMEOUT = 30


def call(method, *args, **kwargs):
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return method(*args, _request_timeout=TIMEOUT, **kwargs)
    except ApiException as exc:
        raise translate_status(exc.status or 0, api_message(exc)) from None
    except (HTTPError, OSError) as exc:
        raise ApiUnavailable(f"{type(exc).__name__}: {exc}") from None


class OperatorApi:
    def __init__(self, api_client, namespace: str, component: str = "isdr-operator"):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.component = component
        self.host = socket.gethostname()

    # --- DicomSeries ---

    def get_series(self, name: str) -> dict | None:
        try:
            return call(self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name)
        except NotFound:
            return None

    def list_series(self) -> list[dict]:
        return call(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL)["items"]

    def patch_series_status(self, body: dict, status: dict) -> dict:
        """Merge `status` in, only if the object is still the version we read (else Conflict)."""
        patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": status}
        return call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, self.namespace,
                    PLURAL, body["metadata"]["name"], patch, _content_type=MERGE)

    def delete_series(self, body: dict) -> None:
        from kubernetes import client

        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(
            resource_version=body["metadata"]["resourceVersion"]))
        try:
            call(self.custom.delete_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                 body["metadata"]["name"], body=options)
        except NotFound:
            pass

    # --- Fingerprints ---

    def list_fingerprints(self) -> list[dict]:
        return call(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                    "fingerprints")["items"]

    def get_fingerprint(self, name: str) -> dict | None:
        try:
            return call(self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                        "fingerprints", name)
        except NotFound:
            return None

    def patch_fingerprint_status(self, body: dict, status: dict, guarded: bool = True) -> dict:
        patch = {"status": status}
        if guarded:
            patch["metadata"] = {"resourceVersion": body["metadata"]["resourceVersion"]}
        return call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, self.namespace,
                    "fingerprints", body["metadata"]["name"], patch, _content_type=MERGE)

    def key_problem(self, kind: str, name: str, key: str) -> str | None:
        """What is wrong with a ConfigMap/Secret key reference (None: it resolves)."""
        read = self.core.read_namespaced_config_map if kind == "ConfigMap" else self.core.read_namespaced_secret
        try:
            obj = call(read, name, self.namespace)
        except NotFound:
            return f"{kind} {name} not found in namespace {self.namespace}"
        data = {**(obj.data or {}), **(getattr(obj, "binary_data", None) or {})}
        if key not in data:
            return f"{kind} {name} has no key {key!r}"
        return None

    # --- Jobs ---

    def list_jobs(self) -> list[dict]:
        """The Jobs this operator made (label isdr.io/managed-by), as plain dicts."""
        response = call(self.batch.list_namespaced_job, self.namespace,
                        label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}", _preload_content=False)
        return json.loads(response.data)["items"]

    # --- kopf's peering ---

    def get_peering_status(self, name: str) -> dict | None:
        """The status of the KopfPeering `name` ({} when empty), None when it does not exist."""
        try:
            body = call(self.custom.get_namespaced_custom_object, "kopf.dev", "v1", self.namespace,
                        "kopfpeerings", name)
        except NotFound:
            return None
        return body.get("status") or {}

    def job_exists(self, name: str) -> bool:
        try:
            call(self.batch.read_namespaced_job, name, self.namespace)
            return True
        except NotFound:
            return False

    def create_job(self, job: dict) -> bool:
        """True if created, False if it existed already (a re-dispatch after a restart)."""
        try:
            call(self.batch.create_namespaced_job, self.namespace, job)
            return True
        except (Conflict, AlreadyExists):
            return False

    # --- Events ---

    def event(self, body: dict, reason: str, message: str, warning: bool = False) -> None:
        """Post an Event on `body`; failures are logged, never raised (events are best effort)."""
        now = to_rfc3339(time.time())
        meta = body["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
                "kind": body.get("kind"),
                "name": meta["name"],
                "namespace": self.namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1000],
            "type": "Warning" if warning else "Normal",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": None,
            "count": 1,
            "source": {"component": self.component, "host": self.host},
            "reportingComponent": self.component,
            "reportingInstance": self.host,
        }
        try:
            call(self.core.create_namespaced_event, self.namespace, event)
        except Exception as exc:  # noqa: BLE001 - an event is never worth failing a step for
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc)
