"""An administrator's isdr.io/cancel, carried out from the operator: a task's Job is deleted (its
pod with it) and its task on the InferenceServer too, through the Fingerprint's server and CA
bundle as its Job would reach them (the bundle read from its ConfigMap or Secret)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

from relay.fingerprints.manifest import FingerprintError, fingerprint_from_manifest
from relay.inference.client import ClientSettings, InferenceError, make_client
from relay.kube.api import ApiError, KubeApi
from relay.lifecycle import TaskState, cancelled_remote
from relay.state_store import read_task
from relay.storage.base import Storage

from isdr_operator.settings import OperatorSettings

log = logging.getLogger("isdr_operator.cancel")


def _ca_reference(fingerprint_body: dict, settings: OperatorSettings) -> tuple[str, str, str] | None:
    """(kind, name, key) of the CA bundle the task's Job mounts (the Fingerprint's, else the relay's)."""
    ca = fingerprint_body["spec"]["inferenceServer"].get("caBundle") or {}
    for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
        if field in ca:
            return kind, ca[field]["name"], ca[field]["key"]
    jobs = settings.jobs
    if jobs.ca_bundle_key and (jobs.ca_bundle_configmap or jobs.ca_bundle_secret):
        kind = "ConfigMap" if jobs.ca_bundle_configmap else "Secret"
        return kind, jobs.ca_bundle_configmap or jobs.ca_bundle_secret, jobs.ca_bundle_key
    return None


def delete_remote_task(api: KubeApi, settings: OperatorSettings, fingerprint_body: dict | None,
                       uid: str) -> str | None:
    """Delete task `uid` on the Fingerprint's InferenceServer; None when done, else why not."""
    if fingerprint_body is None:
        return "its Fingerprint is gone"
    try:
        fingerprint = fingerprint_from_manifest(fingerprint_body, source=fingerprint_body["metadata"]["name"])
    except FingerprintError as exc:
        return f"its Fingerprint cannot be used: {exc}"
    with tempfile.TemporaryDirectory(prefix="isdr-cancel-") as folder:
        ca_file = None
        reference = _ca_reference(fingerprint_body, settings)
        if reference is not None:
            try:
                ca_file = Path(folder) / "ca.pem"
                ca_file.write_text(api.key_text(*reference))
            except ApiError as exc:
                return f"its CA bundle cannot be read: {exc}"
        server = replace(fingerprint.inference_server, ca_bundle=str(ca_file) if ca_file else None)
        client = make_client(server, ClientSettings(post_timeout=settings.relay.post_timeout), Path(folder))
        try:
            client.delete(uid)
        except InferenceError as exc:
            return str(exc)
    return None


def cancel_task(api: KubeApi, settings: OperatorSettings, storage: Storage, task: TaskState,
                fingerprint_body: dict | None) -> str:
    """End the task's Job and remote task; returns what became of the remote task."""
    if api.delete_job(task.task_id):
        log.info("deleted Job %s (cancelled)", task.task_id)
    record = read_task(storage, task.task_id)  # the pod's own record knows the uid first
    uid = (record.inference_uid if record else None) or task.inference_uid
    error = delete_remote_task(api, settings, fingerprint_body, uid) if uid else None
    return cancelled_remote(uid, record.unknown_submits if record else 0, error)
