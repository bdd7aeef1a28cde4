"""The operator's settings: the relay's own (relay.config) plus how to build Jobs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from relay.config import ENV_VARIABLES, Settings, load_settings

# Relay settings a task's pod needs, passed on from the operator's environment unchanged.
TASK_ENV = (
    "STORAGE", "INCOMING_DIR", "S3_ENDPOINT_URL", "S3_BUCKET", "S3_PREFIX", "S3_REGION",
    "CERT_FILE", "POST_TIMEOUT", "GET_INTERVAL", "GET_TIMEOUT", "ASK_INFERENCE_SERVER_TO_DELETE_TASK",
    "NOT_FOUND_GRACE", "MAX_OUTPUT_BYTES", "DELIVERY_TIMEOUT", "DELIVERY_AE_TITLE", "SCP_AE_TITLE",
    "LOG_LEVEL",
)
assert set(TASK_ENV) <= set(ENV_VARIABLES)


@dataclass(frozen=True)
class JobSettings:
    image: str = "ghcr.io/isdr/isdr:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_account: str | None = None
    ttl_seconds_after_finished: int = 86400  # a day of `kubectl logs job/<name>`
    backoff_limit: int = 3
    cpu_request: str = "100m"
    memory_request: str = "256Mi"
    memory_limit: str | None = "2Gi"
    # Seconds a Job may run beyond its fingerprint's timeout: submitting and delivering take time.
    deadline_margin: int = 3600
    storage_pvc_claim: str | None = None  # pvc mode: the claim mounted at INCOMING_DIR
    s3_credentials_secret: str | None = None  # s3 mode: a Secret with AWS_* keys
    env_configmap: str | None = None  # the chart's ConfigMap of relay settings
    # The relay-wide CA bundle (CERT_FILE), mounted in Jobs where CERT_FILE points.
    ca_bundle_configmap: str | None = None
    ca_bundle_secret: str | None = None
    ca_bundle_key: str | None = None
    task_env: Mapping[str, str] = field(default_factory=dict)  # relay settings for the pod
    # Where the Jobs' pods run, and how (chart values job.nodeSelector, ... -> JOB_* -> Job spec).
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)  # e.g. sidecar.istio.io/inject
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    priority_class_name: str | None = None
    # None: the operator's defaults (non-root, RuntimeDefault seccomp, no privilege, read-only root)
    pod_security_context: Mapping[str, Any] | None = None
    security_context: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str
    relay: Settings
    jobs: JobSettings


def _json(environ: Mapping[str, str], name: str, kind: type, default):
    """A JSON setting (the chart renders values as JSON); a wrong type is a clear error."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc})") from None
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected a JSON {'object' if kind is dict else 'array'}, got {text[:80]!r}")
    return value


def load_operator_settings(namespace: str | None = None, environ: Mapping[str, str] | None = None
                           ) -> OperatorSettings:
    environ = os.environ if environ is None else environ
    relay = load_settings(environ)

    def get(name, default=None):
        value = environ.get(name, "").strip()
        return value or default

    jobs = JobSettings(
        image=get("JOB_IMAGE", JobSettings.image),
        image_pull_policy=get("JOB_IMAGE_PULL_POLICY", JobSettings.image_pull_policy),
        service_account=get("JOB_SERVICE_ACCOUNT"),
        ttl_seconds_after_finished=int(get("JOB_TTL_SECONDS_AFTER_FINISHED", JobSettings.ttl_seconds_after_finished)),
        backoff_limit=int(get("JOB_BACKOFF_LIMIT", JobSettings.backoff_limit)),
        cpu_request=get("JOB_CPU_REQUEST", JobSettings.cpu_request),
        memory_request=get("JOB_MEMORY_REQUEST", JobSettings.memory_request),
        memory_limit=get("JOB_MEMORY_LIMIT", JobSettings.memory_limit),
        deadline_margin=int(get("JOB_DEADLINE_MARGIN_SECONDS", JobSettings.deadline_margin)),
        storage_pvc_claim=get("STORAGE_PVC_CLAIM"),
        s3_credentials_secret=get("S3_CREDENTIALS_SECRET"),
        env_configmap=get("JOB_ENV_CONFIGMAP"),
        ca_bundle_configmap=get("CA_BUNDLE_CONFIGMAP"),
        ca_bundle_secret=get("CA_BUNDLE_SECRET"),
        ca_bundle_key=get("CA_BUNDLE_KEY"),
        # With the chart's ConfigMap (envFrom) the Jobs get their relay settings from there, not
        # copied from the operator's own environment.
        task_env={} if get("JOB_ENV_CONFIGMAP") else {name: environ[name] for name in TASK_ENV if environ.get(name)},
        node_selector=_json(environ, "JOB_NODE_SELECTOR", dict, {}),
        tolerations=tuple(_json(environ, "JOB_TOLERATIONS", list, [])),
        affinity=_json(environ, "JOB_AFFINITY", dict, {}),
        pod_annotations=_json(environ, "JOB_POD_ANNOTATIONS", dict, {}),
        pod_labels=_json(environ, "JOB_POD_LABELS", dict, {}),
        priority_class_name=get("JOB_PRIORITY_CLASS_NAME"),
        pod_security_context=_json(environ, "JOB_POD_SECURITY_CONTEXT", dict, None),
        security_context=_json(environ, "JOB_SECURITY_CONTEXT", dict, None),
    )
    return OperatorSettings(
        namespace=namespace or get("POD_NAMESPACE") or "default",
        relay=relay,
        jobs=jobs,
    )
