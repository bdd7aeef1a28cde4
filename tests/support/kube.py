"""A real Kubernetes API for the tests: where the binaries are, a small REST client, the cluster handle
and the pytest fixtures (`kube_cluster`, `node_agent`, `kube_namespace`).

The fixtures are defined here and imported by tests/kube/conftest.py; tests that need a cluster live
under tests/kube/ so that one session shares one control plane. See docs/development-kubernetes.md.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.processes import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
HACK_DIR = REPO_ROOT / "hack" / "k8s"
CRDS_DIR = REPO_ROOT / "crds"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
TOOL_BINARIES = ("kubectl", "helm")


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def use_existing_cluster() -> bool:
    """USE_EXISTING_CLUSTER=true: run against the current KUBECONFIG (kind, k3d, ...), as envtest does."""
    return truthy(os.environ.get("USE_EXISTING_CLUSTER"))


def pinned_version(module_dir: str, module: str) -> str:
    """The version hack/k8s/<module_dir>/go.mod requires `module` at."""
    text = (HACK_DIR / module_dir / "go.mod").read_text()
    for line in text.splitlines():
        fields = line.split()
        for i in range(len(fields) - 1):
            if fields[i] == module and re.match(r"v\d", fields[i + 1]) and (i == 0 or fields[i - 1] != "=>"):
                return fields[i + 1]
    raise LookupError(f"{module} is not pinned in hack/k8s/{module_dir}/go.mod")


K8S_VERSION = pinned_version("kubernetes", "k8s.io/kubernetes")


def assets_dir() -> Path:
    """Where hack/k8s/ensure-binaries.sh puts (and the fixtures find) the binaries."""
    for var in ("KUBEBUILDER_ASSETS", "ISDR_K8S_ASSETS"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path.home() / ".cache" / "isdr" / "k8s-assets" / K8S_VERSION


def find_asset(name: str) -> Path | None:
    path = assets_dir() / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def tool_path(name: str) -> str | None:
    """kubectl/helm: the ones built from the pinned modules, else (only for an existing cluster) PATH's."""
    built = find_asset(name)
    if built is not None:
        return str(built)
    if use_existing_cluster():
        return shutil.which(name)
    return None


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------------
# A small JSON client of the Kubernetes REST API (used by the node agent and the fixtures; tests use
# the official `kubernetes` client through KubeCluster.api_client).


class KubeError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status = status
        self.body = body
        reason = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"{method} {path}: HTTP {status}: {reason}")


class KubeREST:
    """requests-based client configured from a kubeconfig file (client certificates or bearer token)."""

    def __init__(self, kubeconfig: str | os.PathLike, context: str | None = None, timeout: float = 30.0):
        import requests
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), context=context, client_configuration=configuration)
        self.configuration = configuration
        self.server = configuration.host.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        # Passed with every request: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override session.verify.
        self.verify = (configuration.ssl_ca_cert or True) if configuration.verify_ssl else False
        self.session.verify = self.verify
        if configuration.cert_file and configuration.key_file:
            self.session.cert = (configuration.cert_file, configuration.key_file)
        token = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get("BearerToken")
        if token:
            self.session.headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        self.session.headers["Accept"] = "application/json"

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", ok_missing: bool = False, timeout: float | None = None):
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        response = self.session.request(method, self.server + path, data=data, params=params, headers=headers,
                                        timeout=timeout or self.timeout, verify=self.verify)
        if response.status_code == 404 and ok_missing:
            return None
        try:
            payload = response.json()
        except ValueError:
            payload = response.text
        if response.status_code >= 400:
            raise KubeError(response.status_code, payload, method, path)
        return payload

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw):
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, body: Any = None, **kw):
        return self.request("DELETE", path, body, **kw)

    def patch(self, path: str, body: Any, kind: str = "strategic", **kw):
        content_type = {
            "strategic": "application/strategic-merge-patch+json",
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
        }[kind]
        return self.request("PATCH", path, body, content_type=content_type, **kw)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 60, stop=None) -> Iterator[dict]:
        """Yield watch events (dicts with type and object) until the server ends the stream."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        with self.session.get(self.server + path, params=params, stream=True, verify=self.verify,
                              timeout=(10, timeout_seconds + 30)) as response:
            if response.status_code >= 400:
                raise KubeError(response.status_code, response.text, "WATCH", path)
            self._watch_response = response
            for line in response.iter_lines():
                if stop is not None and stop.is_set():
                    return
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        self.session.close()


def list_and_watch(rest: KubeREST, watch_rest: KubeREST, path: str, handle, stopping, listed=None,
                   what: str = "watch") -> None:
    """List `path`, then watch it, until `stopping` (a threading.Event) is set, as informers do.

    handle(event_type, object) gets every object as ADDED after each listing, then the watch's
    ADDED, MODIFIED and DELETED events; listed(uids) gets the uids present after each listing (to
    forget what vanished while not watching). A failed or expired (410 Gone) watch lists again."""
    import logging

    log = logging.getLogger("node-agent")
    resource_version = None
    while not stopping.is_set():
        try:
            if resource_version is None:
                listing = rest.get(path)
                resource_version = listing["metadata"]["resourceVersion"]
                for item in listing["items"]:
                    handle("ADDED", item)
                if listed is not None:
                    listed({item["metadata"]["uid"] for item in listing["items"]})
            for event in watch_rest.watch(path, resource_version, timeout_seconds=60, stop=stopping):
                kind, obj = event.get("type"), event.get("object", {})
                if kind == "ERROR":
                    resource_version = None  # e.g. 410 Gone: list again
                    break
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    handle(kind, obj)
        except Exception as exc:  # noqa: BLE001
            if stopping.is_set():
                return
            log.warning("%s of %s failed (listing again): %r", what, path, exc)
            resource_version = None
            stopping.wait(1.0)


# --------------------------------------------------------------------------------------------------
# kubeconfig files


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, *, cert_pem: bytes | None = None,
                     key_pem: bytes | None = None, token: str | None = None, user: str = "admin",
                     cluster: str = "isdr-test") -> Path:
    user_entry: dict[str, Any] = {}
    if cert_pem is not None:
        user_entry["client-certificate-data"] = base64.b64encode(cert_pem).decode()
        user_entry["client-key-data"] = base64.b64encode(key_pem).decode()
    if token is not None:
        user_entry["token"] = token
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": f"{user}@{cluster}", "context": {"cluster": cluster, "user": user}}],
        "current-context": f"{user}@{cluster}",
        "preferences": {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return path


def kubeconfig_cluster(kubeconfig: str | os.PathLike) -> tuple[str, bytes]:
    """(server URL, CA PEM) of the kubeconfig's current context."""
    document = yaml.safe_load(Path(kubeconfig).read_text())
    context_name = document.get("current-context")
    context = next(c["context"] for c in document["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in document["clusters"] if c["name"] == context["cluster"])
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    elif "certificate-authority" in cluster:
        ca = Path(cluster["certificate-authority"]).read_bytes()
    else:
        ca = b""
    return cluster["server"], ca


# --------------------------------------------------------------------------------------------------
# The cluster handle given to tests


def load_manifests(path: Path) -> list[dict]:
    paths = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")) if path.is_dir() else [path]
    documents = []
    for file in paths:
        for document in yaml.safe_load_all(file.read_text()):
            if document:
                documents.append(document)
    return documents


class KubeCluster:
    """What a test gets from the `kube_cluster` fixture.

    kubeconfig   path of an admin kubeconfig (the generated one, or the user's for USE_EXISTING_CLUSTER)
    existing     True when running against USE_EXISTING_CLUSTER
    api_client   a kubernetes.client.ApiClient for that kubeconfig (not the global default)
    rest         a KubeREST (plain JSON) client
    kubectl(...) / helm(...)   run the pinned kubectl/helm against the cluster
    pod_log(namespace, pod)    a pod's output: the local node agent's log file, else the API's pods/log
    """

    def __init__(self, kubeconfig: Path, existing: bool, work_dir: Path, control_plane=None):
        self.kubeconfig = Path(kubeconfig)
        self.existing = existing
        self.work_dir = Path(work_dir)
        self.control_plane = control_plane
        self.node_agent = None  # set by the node_agent fixture (a NodeAgentProcess)
        self.rest = KubeREST(self.kubeconfig)
        self.server = self.rest.server
        self._api_client = None

    # --- official client ---------------------------------------------------------------------
    @property
    def api_client(self):
        if self._api_client is None:
            from kubernetes import config

            self._api_client = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api_client

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def batch(self):
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @property
    def apps(self):
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    @property
    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @property
    def apiextensions(self):
        from kubernetes import client

        return client.ApiextensionsV1Api(self.api_client)

    # --- command-line tools ------------------------------------------------------------------
    def tool_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        helm_home = self.work_dir / "helm"
        env.setdefault("HELM_CACHE_HOME", str(helm_home / "cache"))
        env.setdefault("HELM_CONFIG_HOME", str(helm_home / "config"))
        env.setdefault("HELM_DATA_HOME", str(helm_home / "data"))
        return env

    def _run_tool(self, name: str, args: tuple, input: str | None, check: bool, timeout: float):
        path = tool_path(name)
        if path is None:
            from tests.support.processes import missing

            missing(f"{name} (build it with hack/k8s/ensure-binaries.sh)")
        result = subprocess.run([path, "--kubeconfig", str(self.kubeconfig), *map(str, args)], input=input,
                                capture_output=True, text=True, env=self.tool_env(), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{name} {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def kubectl(self, *args, input: str | None = None, check: bool = True, timeout: float = 120.0):
        return self._run_tool("kubectl", args, input, check, timeout)

    def helm(self, *args, check: bool = True, timeout: float = 300.0):
        return self._run_tool("helm", args, None, check, timeout)

    # --- objects -----------------------------------------------------------------------------
    def install_crds(self, path: Path = CRDS_DIR, timeout: float = 60.0) -> list[str]:
        """Create or update every CustomResourceDefinition in path (a file or a folder of *.yaml)."""
        if not Path(path).exists():
            return []
        names = []
        base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for document in load_manifests(Path(path)):
            if document.get("kind") != "CustomResourceDefinition":
                continue
            name = document["metadata"]["name"]
            current = self.rest.get(f"{base}/{name}", ok_missing=True)
            if current is None:
                self.rest.post(base, document)
            else:
                document = dict(document)
                version = current["metadata"]["resourceVersion"]
                document["metadata"] = dict(document["metadata"], resourceVersion=version)
                self.rest.put(f"{base}/{name}", document)
            names.append(name)
        for name in names:
            self.wait_crd_established(name, timeout)
        return names

    def wait_crd_established(self, name: str, timeout: float = 60.0) -> None:
        def established():
            crd = self.rest.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = crd.get("status", {}).get("conditions", [])
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_until(established, timeout, what=f"CRD {name} to be Established")

    def create_namespace(self, prefix: str = "test", labels: dict | None = None, timeout: float = 30.0) -> str:
        """A fresh namespace, returned once its default ServiceAccount and kube-root-ca.crt ConfigMap exist
        (the controller-manager makes them; pods need both)."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.rest.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": name, "labels": labels or {}}})
        for path in (f"/api/v1/namespaces/{name}/serviceaccounts/default",
                     f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt"):
            wait_until(lambda path=path: self.rest.get(path, ok_missing=True), timeout, interval=0.05,
                       what=f"{path} to be created")
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 60.0) -> None:
        self.rest.delete(f"/api/v1/namespaces/{name}", ok_missing=True)
        if wait:
            wait_until(lambda: self.rest.get(f"/api/v1/namespaces/{name}", ok_missing=True) is None,
                       timeout, what=f"namespace {name} to be deleted")

    # --- pods --------------------------------------------------------------------------------
    def pod_log(self, namespace: str, pod_name: str, container: str | None = None, previous: bool = False) -> str:
        """The output of a pod's container (like `kubectl logs`)."""
        if self.node_agent is not None or os.environ.get("ISDR_NODE_AGENT_WORK_DIR"):
            from tests.support import node_agent

            work_dir = self.node_agent.work_dir if self.node_agent is not None else None
            return node_agent.pod_log(namespace, pod_name, container, previous=previous, work_dir=work_dir)
        params = {"previous": "true" if previous else "false"}
        if container:
            params["container"] = container
        response = self.rest.session.get(f"{self.server}/api/v1/namespaces/{namespace}/pods/{pod_name}/log",
                                         params=params, timeout=30, verify=self.rest.verify)
        if response.status_code >= 400:
            raise KubeError(response.status_code, response.text, "GET", f"pods/{pod_name}/log")
        return response.text

    def job_pods(self, namespace: str, job_name: str) -> list[dict]:
        return self.rest.get(f"/api/v1/namespaces/{namespace}/pods",
                             params={"labelSelector": f"batch.kubernetes.io/job-name={job_name}"})["items"]

    def wait_job_condition(self, namespace: str, job_name: str, condition: str | tuple = ("Complete", "Failed"),
                           timeout: float = 120.0) -> dict:
        """Wait until the Job has one of the conditions (status True); return the Job."""
        wanted = (condition,) if isinstance(condition, str) else tuple(condition)

        def finished():
            job = self.rest.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{job_name}")
            for c in job.get("status", {}).get("conditions", []) or []:
                if c["type"] in wanted and c["status"] == "True":
                    return job
            return None

        return wait_until(finished, timeout, interval=0.5, what=f"Job {namespace}/{job_name} to be {'/'.join(wanted)}")

    def close(self) -> None:
        if self._api_client is not None:
            self._api_client.close()
        self.rest.close()


def job_condition(job: dict, condition: str) -> dict | None:
    for c in job.get("status", {}).get("conditions", []) or []:
        if c["type"] == condition and c["status"] == "True":
            return c
    return None


# --------------------------------------------------------------------------------------------------
# pytest fixtures (imported by tests/kube/conftest.py)

def _keep_dir(request, work_dir: Path) -> bool:
    return request.session.testsfailed > 0 or truthy(os.environ.get("ISDR_KUBE_KEEP"))


KEPT_DIRS: list[str] = []


@pytest.fixture(scope="session")
def kube_cluster(request) -> Iterator[KubeCluster]:
    """A real Kubernetes API: local etcd + kube-apiserver + kube-controller-manager with crds/ installed,
    or the current KUBECONFIG's cluster when USE_EXISTING_CLUSTER=true."""
    from tests.support.processes import missing

    work_dir = Path(tempfile.mkdtemp(prefix="isdr-kube-"))
    if use_existing_cluster():
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
        if not Path(kubeconfig).is_file():
            missing(f"USE_EXISTING_CLUSTER=true but no kubeconfig at {kubeconfig}")
        cluster = KubeCluster(Path(kubeconfig), existing=True, work_dir=work_dir)
        cluster.install_crds()
        try:
            yield cluster
        finally:
            cluster.close()
            shutil.rmtree(work_dir, ignore_errors=True)
        return

    yield from local_cluster(request, work_dir, crds=True)


def local_cluster(request, work_dir: Path, crds: bool = True) -> Iterator[KubeCluster]:
    """Start a control plane of our own in work_dir (with crds/ installed, unless crds=False),
    yield its KubeCluster, stop it; logs are kept when a test failed (or ISDR_KUBE_KEEP)."""
    from tests.support.controlplane import ControlPlane
    from tests.support.processes import missing

    absent = [name for name in CONTROL_PLANE_BINARIES if find_asset(name) is None]
    if absent:
        shutil.rmtree(work_dir, ignore_errors=True)
        missing(f"the Kubernetes test binaries {', '.join(absent)} in {assets_dir()} "
                f"(build them with hack/k8s/ensure-binaries.sh)")
    control_plane = ControlPlane(assets_dir(), work_dir)
    try:
        control_plane.start()
        cluster = KubeCluster(control_plane.kubeconfig, existing=False, work_dir=work_dir,
                              control_plane=control_plane)
        if crds:
            cluster.install_crds()
    except BaseException:
        control_plane.stop()
        KEPT_DIRS.append(f"control plane failed to start; logs in {work_dir / 'logs'}")
        raise
    try:
        yield cluster
    finally:
        cluster.close()
        control_plane.stop()
        if _keep_dir(request, work_dir):
            KEPT_DIRS.append(f"Kubernetes test logs (etcd, kube-apiserver, kube-controller-manager, node agent, "
                             f"pods) kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def node_agent(kube_cluster: KubeCluster):
    """The local node agent (stands in for kubelet + container runtime), or None on an existing cluster.

    Pods are bound to its Node and run as local processes; see tests/support/node_agent.py. With
    USE_EXISTING_CLUSTER and ISDR_NODE_AGENT_WORK_DIR (an agent you started yourself), a handle on it."""
    from tests.support.node_agent import NodeAgentProcess

    if kube_cluster.existing:
        work_dir = os.environ.get("ISDR_NODE_AGENT_WORK_DIR")
        yield NodeAgentProcess.attach(work_dir) if work_dir else None
        return

    from tests.support.controlplane import kubelet_args

    tls = kube_cluster.control_plane.kubelet_tls if kube_cluster.control_plane is not None else None
    agent = NodeAgentProcess(kube_cluster.kubeconfig, kube_cluster.work_dir / "node-agent",
                             log_path=kube_cluster.work_dir / "logs" / "node-agent.log",
                             extra_args=kubelet_args(tls))
    agent.start()
    kube_cluster.node_agent = agent
    try:
        yield agent
    finally:
        kube_cluster.node_agent = None
        agent.stop()


@pytest.fixture
def kube_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = kube_cluster.create_namespace("t")
    try:
        yield name
    finally:
        if not truthy(os.environ.get("ISDR_KUBE_KEEP")):
            kube_cluster.delete_namespace(name)


def report_kept_dirs(terminalreporter) -> None:
    """pytest_terminal_summary helper: say where the kept logs are."""
    for line in KEPT_DIRS:
        terminalreporter.write_line(line)


__all__ = [
    "KubeCluster",
    "KubeREST",
    "KubeError",
    "K8S_VERSION",
    "assets_dir",
    "find_asset",
    "job_condition",
    "kube_cluster",
    "kube_namespace",
    "node_agent",
    "use_existing_cluster",
    "wait_until",
]
