"""One Kubernetes Job per inference task, built as plain data by a pure function.

The Job's name is the task id (deterministic: the same series, fingerprint and dispatch give
the same name), so creating it again after an operator restart is a no-op (409 AlreadyExists).
The pod gets no API access: it reads the instances from storage and records its progress there.
"""

from __future__ import annotations

import json

from relay.kube.job_contract import (
    CONTAINER,
    DESTINATION_CA_FILE,
    DESTINATION_CLIENT_CERTIFICATE_FILE,
    DESTINATION_CLIENT_KEY_FILE,
    FINGERPRINT_CA_ENV,
    FINGERPRINT_ENV,
    JobExit,
    destination_tls_dir,
    destination_tls_env,
    job_command_line,
)
from relay.kube.resources import (
    ANNOTATION_SERIES_UID,
    API_VERSION,
    FINGERPRINT_KIND,
    LABEL_FINGERPRINT,
    LABEL_MANAGED_BY,
    LABEL_SERIES,
    LABEL_STUDY,
    LABEL_TASK,
    MANAGED_BY,
    study_label,
)
from relay.lifecycle import TaskState
from relay.uids import SeriesKey

from isdr_operator.settings import JobSettings

CA_MOUNT = "/etc/isdr/fingerprint-ca"
RELAY_CA_MOUNT = "/etc/isdr/ca"  # where the chart points CERT_FILE
STORAGE_MOUNT = "/data"  # pvc storage: the claim, and the Job's INCOMING_DIR
SCRATCH_DIR = "/tmp/isdr"  # s3 storage: INCOMING_DIR is scratch space on the /tmp emptyDir
# The defaults when the chart gives none: non-root (the image's numeric USER), no privileges.
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]}}


def job_labels(series_name: str, fingerprint: str, task_id: str, study_uid: str = "") -> dict[str, str]:
    """A study task's Job also names its study (LABEL_STUDY): every series of it follows the Job."""
    labels = {
        "app.kubernetes.io/name": "isdr",
        "app.kubernetes.io/component": "inference-task",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_SERIES: series_name,
        LABEL_FINGERPRINT: fingerprint,
        LABEL_TASK: task_id,
    }
    if study_uid:
        labels[LABEL_STUDY] = study_label(study_uid)
    return labels


def fingerprint_snapshot(body: dict) -> dict:
    """The parts of a Fingerprint resource a task needs (no status, no managed fields)."""
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": FINGERPRINT_KIND,
        "metadata": {"name": body["metadata"]["name"]},
        "spec": body["spec"],
    }


def active_deadline(fingerprint_body: dict, relay_get_timeout: float, settings: JobSettings) -> int:
    timeout = fingerprint_body["spec"]["inferenceServer"].get("timeoutSeconds") or relay_get_timeout
    return int(timeout) + settings.deadline_margin


def build_job(*, task: TaskState, key: SeriesKey, series_name: str, fingerprint_body: dict,
              settings: JobSettings, relay_get_timeout: float, owner: dict | None = None,
              study_uid: str = "") -> dict:
    labels = job_labels(series_name, task.fingerprint, task.task_id, study_uid if task.entry else "")
    env = [{"name": name, "value": value} for name, value in sorted(settings.task_env.items())
           if name != "INCOMING_DIR"]
    env.append({"name": FINGERPRINT_ENV, "value": json.dumps(fingerprint_snapshot(fingerprint_body))})
    env_from, volumes, mounts = [], [], []

    # INCOMING_DIR is the Job's own, never copied from the operator's environment (where it names
    # the operator's mount): the claim's mount, or scratch space next to the bucket.
    if settings.storage_pvc_claim:
        volumes.append({"name": "storage",
                        "persistentVolumeClaim": {"claimName": settings.storage_pvc_claim}})
        mounts.append({"name": "storage", "mountPath": STORAGE_MOUNT})
        env.append({"name": "INCOMING_DIR", "value": STORAGE_MOUNT})
    else:
        env.append({"name": "INCOMING_DIR", "value": SCRATCH_DIR})
    if settings.env_configmap:
        env_from.append({"configMapRef": {"name": settings.env_configmap}})
    if settings.s3_credentials_secret:
        env_from.append({"secretRef": {"name": settings.s3_credentials_secret}})
    relay_ca = _key_volume(settings.ca_bundle_configmap, settings.ca_bundle_secret,
                           settings.ca_bundle_key, settings.ca_bundle_key)
    if relay_ca:
        volumes.append({"name": "relay-ca", **relay_ca})
        mounts.append({"name": "relay-ca", "mountPath": RELAY_CA_MOUNT, "readOnly": True})

    ca_ref = (fingerprint_body["spec"]["inferenceServer"].get("caBundle") or {})
    config_map, secret = ca_ref.get("configMapKeyRef"), ca_ref.get("secretKeyRef")
    ref = config_map or secret or {}
    source = _key_volume((config_map or {}).get("name"), (secret or {}).get("name"), ref.get("key"), "ca.pem")
    if source:
        volumes.append({"name": "fingerprint-ca", **source})
        mounts.append({"name": "fingerprint-ca", "mountPath": CA_MOUNT, "readOnly": True})
        env.append({"name": FINGERPRINT_CA_ENV, "value": f"{CA_MOUNT}/ca.pem"})

    for index, source in destination_tls_volumes(fingerprint_body):
        volumes.append({"name": f"destination-{index}-tls", **source})
        mounts.append({"name": f"destination-{index}-tls", "mountPath": destination_tls_dir(index), "readOnly": True})
        env.append({"name": destination_tls_env(index), "value": destination_tls_dir(index)})

    # A scratch folder, since the root filesystem is read-only. The task's working copies go to
    # WORK_DIR: on the shared volume (INCOMING_DIR/work, swept by the operator) in volume mode,
    # in this pod's own emptyDir (gone with the pod) in S3 mode.
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    env.append({"name": "TMPDIR", "value": "/tmp"})
    if not settings.storage_pvc_claim and "WORK_DIR" not in settings.task_env:
        env.append({"name": "WORK_DIR", "value": "/tmp/work"})

    resources = {"requests": {"cpu": settings.cpu_request, "memory": settings.memory_request}}
    if settings.memory_limit:
        resources["limits"] = {"memory": settings.memory_limit}

    command, args = job_command_line(task.task_id, key, task.generation)
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "args": args,
        "env": env,
        "envFrom": env_from,
        "volumeMounts": mounts,
        "resources": resources,
        "securityContext": dict(settings.security_context if settings.security_context is not None
                                else SECURITY_CONTEXT),
    }
    pod_spec = {
        "restartPolicy": "Never",  # each retry is a new pod: the logs of every attempt stay
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
        "securityContext": dict(settings.pod_security_context if settings.pod_security_context is not None
                                else POD_SECURITY_CONTEXT),
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    pod_spec.update(scheduling(settings, fingerprint_body["spec"].get("priorityClassName")))

    metadata = {
        "name": task.task_id,
        "labels": labels,
        "annotations": {ANNOTATION_SERIES_UID: key.series_uid},
    }
    if owner:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": active_deadline(fingerprint_body, relay_get_timeout, settings),
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            # A task that failed for good (exit 2) is not retried; a crash or a kill is.
            "podFailurePolicy": {"rules": [{
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [int(JobExit.FAILED)]},
            }]},
            "template": {"metadata": pod_metadata(labels, settings), "spec": pod_spec},
        },
    }


def scheduling(settings: JobSettings, priority_class_name: str | None = None) -> dict:
    """Where the Job's pod may run: the chart's job.nodeSelector, tolerations, affinity and
    priorityClassName, as given (the API server validates them); the Fingerprint's own
    spec.priorityClassName (`priority_class_name`) wins over the chart's."""
    fields = {}
    if settings.node_selector:
        fields["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        fields["tolerations"] = list(settings.tolerations)
    if settings.affinity:
        fields["affinity"] = dict(settings.affinity)
    if priority_class_name or settings.priority_class_name:
        fields["priorityClassName"] = priority_class_name or settings.priority_class_name
    return fields


def pod_metadata(labels: dict[str, str], settings: JobSettings) -> dict:
    """The pod template's labels (the operator's own win) and annotations, e.g.
    sidecar.istio.io/inject: "false" so that a mesh's sidecar does not keep the Job running."""
    metadata: dict = {"labels": {**settings.pod_labels, **labels}}
    if settings.pod_annotations:
        metadata["annotations"] = dict(settings.pod_annotations)
    return metadata


def destination_tls_volumes(fingerprint_body: dict) -> list[tuple[int, dict]]:
    """(destination index, projected volume source) for each destination whose TLS files come
    from a ConfigMap or Secret: its CA bundle as ca.pem, its client Secret's tls.crt and tls.key.
    The Job's `isdr job` finds them by the same names (relay.kube.job_command)."""
    volumes = []
    for index, destination in enumerate(fingerprint_body["spec"]["destinations"]):
        tls = destination.get("tls") or {}
        if not tls.get("enabled"):
            continue
        sources = []
        ca = tls.get("caBundle") or {}
        if "configMapKeyRef" in ca:
            ref = ca["configMapKeyRef"]
            sources.append({"configMap": {"name": ref["name"],
                                          "items": [{"key": ref["key"], "path": DESTINATION_CA_FILE}]}})
        elif "secretKeyRef" in ca:
            ref = ca["secretKeyRef"]
            sources.append({"secret": {"name": ref["name"],
                                       "items": [{"key": ref["key"], "path": DESTINATION_CA_FILE}]}})
        client = (tls.get("clientCertificate") or {}).get("secretName")
        if client:
            sources.append({"secret": {"name": client, "items": [
                {"key": "tls.crt", "path": DESTINATION_CLIENT_CERTIFICATE_FILE},
                {"key": "tls.key", "path": DESTINATION_CLIENT_KEY_FILE}]}})
        if sources:
            volumes.append((index, {"projected": {"sources": sources}}))
    return volumes


def _key_volume(config_map: str | None, secret: str | None, key: str | None, path: str) -> dict | None:
    """A volume source holding one key of a ConfigMap or a Secret as the file `path`."""
    if not key or not (config_map or secret):
        return None
    items = [{"key": key, "path": path}]
    if config_map:
        return {"configMap": {"name": config_map, "items": items}}
    return {"secret": {"secretName": secret, "items": items}}

