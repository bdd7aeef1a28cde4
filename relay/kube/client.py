"""Connecting to the Kubernetes API: one small helper for the receiver, the operator and the Jobs.

Inside a pod (KUBERNETES_SERVICE_HOST is set) the pod's service account is used; elsewhere the
kubeconfig named by KUBECONFIG (colon-separated list allowed), else ~/.kube/config. The global
default configuration of the `kubernetes` package is never touched: every caller gets its own
ApiClient, so that several clients (tests, one per cluster) can live in one process.

The namespace is, in order: the one asked for (`--namespace`), POD_NAMESPACE (the downward API),
the service account's namespace (in a pod) or the kubeconfig context's namespace, else "default".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # token, ca.crt, namespace
DEFAULT_KUBECONFIG = "~/.kube/config"


class KubeConfigError(RuntimeError):
    """No usable Kubernetes configuration (no kubeconfig, a broken one, no service account)."""


@dataclass(frozen=True)
class KubeConnection:
    api_client: object  # kubernetes.client.ApiClient
    namespace: str
    in_cluster: bool
    server: str  # the API server's URL, for log lines

    def close(self) -> None:
        self.api_client.close()


def in_cluster(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


def connect(namespace: str | None = None, *, kubeconfig: str | os.PathLike | None = None,
            context: str | None = None, environ: Mapping[str, str] | None = None,
            service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConnection:
    """An ApiClient for the cluster we run in (or the kubeconfig's), and the namespace to work in.

    `kubeconfig`/`context` force a kubeconfig file and context (and skip the in-cluster check).
    Raises KubeConfigError when no configuration can be loaded.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    environ = os.environ if environ is None else environ
    configuration = client.Configuration()
    config_namespace: str | None = None
    use_cluster = kubeconfig is None and context is None and in_cluster(environ)
    try:
        if use_cluster:
            # The service account token is re-read as the kubelet rotates it (try_refresh_token).
            InClusterConfigLoader(token_filename=str(service_account_dir / "token"),
                                  cert_filename=str(service_account_dir / "ca.crt"),
                                  environ=environ).load_and_set(configuration)
            config_namespace = _read_text(service_account_dir / "namespace")
        else:
            path = str(kubeconfig) if kubeconfig is not None else environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
            # persist_config=False: never write token refreshes back into the user's file.
            config.load_kube_config(config_file=path, context=context, client_configuration=configuration,
                                    persist_config=False)
            config_namespace = context_namespace(path, context)
    except (ConfigException, OSError, ValueError) as exc:
        where = "the pod's service account" if use_cluster else "the kubeconfig (KUBECONFIG or ~/.kube/config)"
        raise KubeConfigError(f"cannot load the Kubernetes configuration from {where}: {exc}") from exc
    return KubeConnection(
        api_client=client.ApiClient(configuration=configuration),
        namespace=resolve_namespace(namespace, environ, config_namespace),
        in_cluster=use_cluster,
        server=configuration.host,
    )


def resolve_namespace(explicit: str | None, environ: Mapping[str, str], config_namespace: str | None) -> str:
    for candidate in (explicit, environ.get("POD_NAMESPACE"), config_namespace):
        if candidate and candidate.strip():
            return candidate.strip()
    return "default"


def context_namespace(kubeconfig: str, context: str | None = None) -> str | None:
    """The namespace of a kubeconfig's context (the current one unless named), if it sets one."""
    from kubernetes import config

    contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = current
    if context is not None:
        chosen = next((c for c in contexts if c.get("name") == context), None)
    if not chosen:
        return None
    return (chosen.get("context") or {}).get("namespace") or None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
