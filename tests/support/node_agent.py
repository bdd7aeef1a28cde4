"""A local node agent for the tests: stands in for kubelet + a container runtime.

It registers a Ready Node (and keeps its Lease and status heart-beating), binds every pending pod to
that Node through the pods/binding subresource (no scheduler runs in the test control plane), and runs
each container's `command` + `args` as a local process of this Python environment, ignoring the image
(so `isdr job ...` or `python -c ...` work). It reports pod status as kubelet does (Pending, Running,
then Succeeded or Failed, with exit codes and start/finish times in containerStatuses), so the real Job
controller completes, retries and fails Jobs by its own rules. A container process killed with SIGKILL
reports exit code 137 and fails its pod. Deleting a pod (Job activeDeadlineSeconds, TTL cleanup,
namespace deletion, ...) stops its processes (SIGTERM, then SIGKILL after the grace period, at most
--max-grace seconds) and then removes the pod object, as kubelet confirms a graceful deletion.

What a container gets:
  * command/args with $(VAR) expanded; `python`/`python3` run this interpreter, and PATH starts with
    its bin directory (so the project's console scripts, e.g. `isdr`, are found);
  * env: value, valueFrom (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef) and envFrom
    (configMapRef, secretRef, prefix), on top of a small base environment (PATH, HOME, LANG, TMPDIR,
    PYTHONPATH, ... and --pass-env NAME);
  * KUBECONFIG: a kubeconfig for the pod's ServiceAccount (a bound token from the TokenRequest API,
    like the token kubelet mounts), unless automountServiceAccountToken is false, so RBAC applies to
    the pod as in a cluster. In-cluster config (KUBERNETES_SERVICE_HOST) is not set; clients fall
    back to KUBECONFIG;
  * volumes as local folders under <work-dir>/pods/<namespace>_<pod>_<uid>/volumes/<volume>: emptyDir,
    secret, configMap, downwardAPI, projected (secret, configMap, downwardAPI, serviceAccountToken);
    persistentVolumeClaim volumes map to <pvc-dir>/<namespace>/<claimName> (one shared folder given
    to the agent, so a test can put files in or read them out); hostPath is used as it is. A container
    does not see its mountPath: every occurrence of a mountPath at a path boundary in its
    command, args, env values and workingDir is rewritten to the local folder (subPath honoured);
  * its output (stdout and stderr) in <pod dir>/logs/<container>/<restartCount>.log (see pod_log()),
    and its pid in <pod dir>/<container>.pid while it runs (see pod_pids());
  * a network of its own, as far as a process on the host's network can have one
    (tests/support/pod_network.py): each declared containerPort is a free host port (env values
    and args naming it are rewritten; pod_port() says where), each Service an address of its own
    forwarding to Ready pods (service_address()), and the pod's own /etc/hosts in which Service
    names resolve, with the pod's name as hostname;
  * kubelet's startup, readiness and liveness probes (tests/support/probes.py): Ready follows the
    readinessProbe, a failed liveness probe restarts the container, failures are Events.
restartPolicy Never, OnFailure and Always are honoured (restarts back off from --restart-backoff
seconds, doubling, like kubelet's 10s); init containers run in order first.

Use it as a pytest fixture (`node_agent` in tests/support/kube.py) or standalone:
    python -m tests.support.node_agent --kubeconfig admin.kubeconfig --work-dir /tmp/agent [--pvc-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tests.support.pod_network import (
    Endpoint,
    HostsFiles,
    PodPorts,
    ServiceProxy,
    isolation_supported,
    pod_port as _pod_port,
    sandbox_preexec,
    selects,
    service_address as _service_address,
)
from tests.support.pod_cgroups import PodCgroups, join, pod_cpu_request
from tests.support.probes import ContainerProber
from tests.support.kube import (
    K8S_VERSION,
    REPO_ROOT,
    KubeError,
    KubeREST,
    kubeconfig_cluster,
    list_and_watch,
    now_rfc3339,
    write_kubeconfig,
)

log = logging.getLogger("node-agent")

DEFAULT_NODE_NAME = "isdr-node"
LOCAL_IP = "127.0.0.1"
PYTHON_NAMES = {"python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"}
BASE_ENV_NAMES = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH",
                  "VIRTUAL_ENV", "PYENV_ROOT", "PYENV_VERSION", "SSL_CERT_FILE", "SSL_CERT_DIR",
                  "REQUESTS_CA_BUNDLE", "CI")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# --------------------------------------------------------------------------------------------------
# Reading what the agent wrote: pod logs and pids (used by tests and by KubeCluster.pod_log).

_default_work_dir: Path | None = None


def set_default_work_dir(path: Path | None) -> None:
    global _default_work_dir
    _default_work_dir = Path(path) if path is not None else None


def _work_dir(work_dir) -> Path:
    if work_dir is not None:
        return Path(work_dir)
    if _default_work_dir is not None:
        return _default_work_dir
    if os.environ.get("ISDR_NODE_AGENT_WORK_DIR"):
        return Path(os.environ["ISDR_NODE_AGENT_WORK_DIR"])
    raise RuntimeError("no node agent work dir: pass work_dir, start the node_agent fixture, "
                       "or set ISDR_NODE_AGENT_WORK_DIR")


def pod_dir(namespace: str, pod_name: str, work_dir=None) -> Path:
    """The newest local folder of the pod with that name (a re-created pod gets a new uid)."""
    candidates = list((_work_dir(work_dir) / "pods").glob(f"{namespace}_{pod_name}_*"))
    if not candidates:
        raise FileNotFoundError(f"the node agent never ran a pod {namespace}/{pod_name}")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def pod_log(namespace: str, pod_name: str, container: str | None = None, previous: bool = False,
            work_dir=None) -> str:
    """What `kubectl logs [--previous] [-c container]` would show, from the agent's log files."""
    directory = pod_dir(namespace, pod_name, work_dir) / "logs"
    if container is None:
        containers = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        if not containers:
            return ""
        main = [c for c in containers if not (directory / c / ".init").exists()]
        if len(main) > 1:
            raise ValueError(f"pod {namespace}/{pod_name} has several containers {main}: name one")
        container = (main or containers)[0]
    runs = sorted((directory / container).glob("*.log"), key=lambda p: int(p.stem))
    if previous:
        if len(runs) < 2:
            raise FileNotFoundError(f"no previous run of {namespace}/{pod_name}/{container}")
        return runs[-2].read_text(errors="replace")
    return runs[-1].read_text(errors="replace") if runs else ""


def pod_pids(namespace: str, pod_name: str, work_dir=None) -> dict[str, int]:
    """{container: pid} of the pod's running processes."""
    pids = {}
    for path in pod_dir(namespace, pod_name, work_dir).glob("*.pid"):
        try:
            pids[path.stem] = int(path.read_text().strip())
        except (OSError, ValueError):
            pass
    return pids


def pvc_path(claim_name: str, namespace: str, pvc_dir) -> Path:
    return Path(pvc_dir) / namespace / claim_name


def pod_port(namespace: str, pod_name: str, port: int | str, work_dir=None) -> int:
    """The host port (on 127.0.0.1) that stands for the pod's container port `port` (number or
    name): what reaching the pod's IP at that port is on a cluster."""
    return _pod_port(pod_dir(namespace, pod_name, work_dir), port)


def service_address(namespace: str, name: str, work_dir=None) -> str:
    """The loopback address that stands for the Service's cluster IP (at the Service's ports)."""
    return _service_address(_work_dir(work_dir), namespace, name)


def service_names_resolve(work_dir=None) -> bool:
    """Whether pods of this agent resolve Service names (they get their own /etc/hosts)."""
    return bool(json.loads((_work_dir(work_dir) / "agent.json").read_text()).get("service_names"))


# --------------------------------------------------------------------------------------------------
# helpers


def console_scripts(root: Path) -> dict[str, str]:
    """[project.scripts] of root/pyproject.toml: {"isdr": "relay.cli:main"}."""
    try:
        import tomllib

        project = tomllib.loads((Path(root) / "pyproject.toml").read_text()).get("project", {})
    except (OSError, ValueError):
        return {}
    return dict(project.get("scripts") or {})


def image_entrypoint(dockerfile: Path) -> list[str]:
    """The exec-form ENTRYPOINT of the Dockerfile's final stage ([] without one): the node agent
    runs every pod from the project's one image, as the chart's pods expect."""
    from tests.support.dockerfile import parse_dockerfile

    try:
        stages = parse_dockerfile(Path(dockerfile).read_text())
    except OSError:
        return []
    entrypoint = stages[-1].last("ENTRYPOINT") if stages else None
    return list(entrypoint.exec_form or []) if entrypoint is not None else []


class ConfigError(Exception):
    """Something a container needs is missing (kubelet: CreateContainerConfigError); retried."""


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, unknown left, $$ escapes."""
    out = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_quantity(value: str) -> float:
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    value = str(value).strip()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * suffixes[suffix]
    return float(value)


class PathRewriter:
    """Rewrites container paths (mountPaths) to the local folders that stand for them."""

    def __init__(self, mounts: list[tuple[str, Path]]):
        self.mounts = sorted(((m.rstrip("/"), local) for m, local in mounts if m.rstrip("/")),
                             key=lambda item: len(item[0]), reverse=True)
        self.pattern = None
        if self.mounts:
            alternatives = "|".join(re.escape(m) for m, _ in self.mounts)
            self.pattern = re.compile(r"(?<![\w.\-/])(" + alternatives + r")(?=/|$|[^\w.\-])")
            self.table = {m: str(local) for m, local in self.mounts}

    def __call__(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(lambda match: self.table[match.group(1)], text)


# --------------------------------------------------------------------------------------------------


class ContainerRun:
    def __init__(self, spec: dict, init: bool = False):
        self.spec = spec
        self.name = spec["name"]
        self.image = spec.get("image", "")
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self.state: dict = {"waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}}
        self.last_state: dict = {}
        self.started_at = ""
        self.container_id = ""
        self.restart_at: float | None = None
        self.done = False  # terminated and not to be restarted
        self.pending_exit = False  # could not start: to be handled as an exit
        self.exit_code: int | None = None
        self.prober: ContainerProber | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def status(self) -> dict:
        entry = {
            "name": self.name,
            "image": self.image or "none",
            "imageID": "",
            "restartCount": self.restarts,
            "ready": "running" in self.state and (self.prober is None or self.prober.ready),
            "started": "running" in self.state and (self.prober is None or self.prober.started),
            "state": self.state,
        }
        if self.container_id:
            entry["containerID"] = self.container_id
        if self.last_state:
            entry["lastState"] = self.last_state
        return entry


class PodRunner(threading.Thread):
    """Runs one pod: its volumes, containers, restarts and status, until it ends or is deleted."""

    def __init__(self, agent: "NodeAgent", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.namespace = meta["namespace"]
        self.name = meta["name"]
        self.uid = meta["uid"]
        self.spec = pod["spec"]
        self.deleting = threading.Event()
        self.gone = threading.Event()
        self.dir = agent.work_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.restart_policy = self.spec.get("restartPolicy", "Always")
        self.inits = [ContainerRun(c, init=True) for c in self.spec.get("initContainers", []) or []]
        self.mains = [ContainerRun(c) for c in self.spec.get("containers", [])]
        self.start_time = now_rfc3339()
        self.phase = "Pending"
        self.conditions: dict[str, dict] = {}
        self.kubeconfig: Path | None = None
        self.volume_paths: dict[str, Path] = {}
        self.sandbox_ready = False
        self._objects: dict[tuple[str, str], dict | None] = {}
        # The pod's network: host ports for its container ports, its hosts file (pod_network.py).
        self.ports = PodPorts(self.inits_and_mains_specs())
        self.hosts_file = self.dir / "etc-hosts"
        self.hostname = (self.spec.get("hostname") or self.name)[:63]
        self.probe_changed = threading.Event()
        self._events: dict[tuple[str, str, str], tuple[str, int]] = {}
        # Its CPU weight among the pods, by its CPU request, as the kubelet's cgroup (pod_cgroups.py).
        self.cgroup = agent.cgroups.pod(self.uid, pod_cpu_request(self.spec))
        self.update(pod)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    def inits_and_mains_specs(self) -> list[dict]:
        return list(self.spec.get("initContainers") or []) + list(self.spec.get("containers") or [])

    def endpoint(self, selector: dict, include_not_ready: bool) -> Endpoint | None:
        """This pod as an endpoint of a Service with `selector`, if it is one (Running, Ready)."""
        labels = self.pod["metadata"].get("labels") or {}
        if not selects(selector, labels) or self.deleting.is_set() or self.phase != "Running":
            return None
        if not include_not_ready and not all(c.status()["ready"] for c in self.mains):
            return None
        return Endpoint(self.name, self.ports)

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def vanished(self) -> None:
        self.gone.set()
        self.deleting.set()

    # --- status ----------------------------------------------------------------------------
    def _condition(self, kind: str, status: bool, reason: str | None = None) -> None:
        value = "True" if status else "False"
        current = self.conditions.get(kind)
        if current is None or current["status"] != value:
            current = {"type": kind, "status": value, "lastTransitionTime": now_rfc3339(), "lastProbeTime": None}
        current = dict(current)
        if reason:
            current["reason"] = reason
        else:
            current.pop("reason", None)
        self.conditions[kind] = current

    def report(self, message: str | None = None) -> None:
        if self.gone.is_set():
            return
        terminal = self.phase in ("Succeeded", "Failed")
        inits_done = all(c.done and c.exit_code == 0 or c.sidecar and "running" in c.state for c in self.inits)
        all_ready = bool(self.mains) and all(c.status()["ready"] for c in self.mains)
        self._condition("PodScheduled", True)
        self._condition("PodReadyToStartContainers", self.sandbox_ready)
        self._condition("Initialized", inits_done or terminal and not self.inits,
                        None if inits_done else "ContainersNotInitialized")
        ready_reason = "PodCompleted" if terminal else (None if all_ready else "ContainersNotReady")
        self._condition("ContainersReady", all_ready and not terminal, ready_reason)
        self._condition("Ready", all_ready and not terminal, ready_reason)
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": list(self.conditions.values()),
            "hostIP": LOCAL_IP,
            "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.mains],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        if message:
            status["message"] = message
        try:
            self.agent.rest.patch(self.path + "/status", {"status": status})
        except KubeError as exc:
            if exc.status == 404:
                self.gone.set()
            else:
                log.warning("%s/%s: status update failed: %s", self.namespace, self.name, exc)
        except Exception as exc:  # noqa: BLE001 - the API server may be going away at the end
            log.warning("%s/%s: status update failed: %r", self.namespace, self.name, exc)

    # --- objects the pod refers to ---------------------------------------------------------
    def _object(self, kind: str, name: str) -> dict | None:
        key = (kind, name)
        if key not in self._objects:
            plural = {"Secret": "secrets", "ConfigMap": "configmaps"}[kind]
            self._objects[key] = self.agent.rest.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}",
                                                     ok_missing=True)
        return self._objects[key]

    def _object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = self._object(kind, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        data: dict[str, bytes] = {}
        if kind == "Secret":
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value)
        else:
            for key, value in (obj.get("data") or {}).items():
                data[key] = value.encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
        return data

    def _key(self, kind: str, ref: dict) -> str | None:
        data = self._object_data(kind, ref["name"], bool(ref.get("optional")))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}")
        return data[ref["key"]].decode(errors="replace")

    def _field(self, path: str) -> str:
        meta = self.pod["metadata"]
        match = re.match(r"metadata\.(labels|annotations)\['(.+)'\]$", path)
        if match:
            return (meta.get(match.group(1)) or {}).get(match.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.agent.node_name,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.hostIP": LOCAL_IP,
            "status.hostIPs": LOCAL_IP,
            "status.podIP": LOCAL_IP,
            "status.podIPs": LOCAL_IP,
        }
        if path not in simple:
            raise ConfigError(f"unsupported fieldRef {path}")
        return simple[path]

    def _resource(self, container: dict, ref: dict) -> str:
        resource = ref["resource"]
        kind, _, name = resource.partition(".")
        resources = container.get("resources") or {}
        value = (resources.get(kind) or {}).get(name) or (resources.get("limits") or {}).get(name)
        if value is None:
            value = {"cpu": str(os.cpu_count() or 1), "memory": str(self.agent.memory_bytes),
                     "ephemeral-storage": str(100 * 2**30)}.get(name, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(int(math.ceil(parse_quantity(value) / divisor)))

    def _token(self, audiences: list[str] | None = None, expiration: int = 86400) -> str:
        account = self.spec.get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": expiration,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
        }
        if audiences:
            spec["audiences"] = audiences
        try:
            result = self.agent.rest.post(
                f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        except KubeError as exc:
            raise ConfigError(f"cannot get a token for serviceaccount {self.namespace}/{account}: {exc}") from exc
        return result["status"]["token"]

    # --- volumes ---------------------------------------------------------------------------
    @staticmethod
    def _write_file(root: Path, relative: str, data: bytes, mode: int | None) -> None:
        target = (root / relative).resolve()
        if not str(target).startswith(str(root.resolve())):
            raise ConfigError(f"volume item path {relative!r} leaves the volume")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if mode is not None:
            os.chmod(target, mode & 0o777)

    def _write_items(self, root: Path, data: dict[str, bytes], items: list | None, default_mode: int | None,
                     source: str) -> None:
        if items:
            for item in items:
                if item["key"] not in data:
                    raise ConfigError(f"key {item['key']} not found in {source}")
                self._write_file(root, item["path"], data[item["key"]], item.get("mode", default_mode))
        else:
            for key, value in data.items():
                self._write_file(root, key, value, default_mode)

    def _write_downward(self, root: Path, items: list, default_mode: int | None) -> None:
        container_specs = {c["name"]: c for c in self.spec.get("containers", [])}
        for item in items or []:
            if "fieldRef" in item:
                value = self._field(item["fieldRef"]["fieldPath"])
            else:
                ref = item["resourceFieldRef"]
                container = container_specs.get(ref.get("containerName")) or self.spec["containers"][0]
                value = self._resource(container, ref)
            self._write_file(root, item["path"], value.encode(), item.get("mode", default_mode))

    def prepare_volumes(self) -> None:
        paths: dict[str, Path] = {}
        for volume in self.spec.get("volumes", []) or []:
            name = volume["name"]
            root = self.dir / "volumes" / name
            if "persistentVolumeClaim" in volume:
                root = pvc_path(volume["persistentVolumeClaim"]["claimName"], self.namespace, self.agent.pvc_dir)
                root.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                root = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                    root.mkdir(parents=True, exist_ok=True)
            else:
                if root.exists() and "emptyDir" not in volume:
                    shutil.rmtree(root)
                root.mkdir(parents=True, exist_ok=True)
                if "secret" in volume:
                    src = volume["secret"]
                    data = self._object_data("Secret", src["secretName"], bool(src.get("optional")))
                    if data is not None:
                        self._write_items(root, data, src.get("items"), src.get("defaultMode", 0o644),
                                          f"secret {src['secretName']}")
                elif "configMap" in volume:
                    src = volume["configMap"]
                    data = self._object_data("ConfigMap", src["name"], bool(src.get("optional")))
                    if data is not None:
                        self._write_items(root, data, src.get("items"), src.get("defaultMode", 0o644),
                                          f"configmap {src['name']}")
                elif "downwardAPI" in volume:
                    self._write_downward(root, volume["downwardAPI"].get("items"),
                                         volume["downwardAPI"].get("defaultMode", 0o644))
                elif "projected" in volume:
                    projected = volume["projected"]
                    default_mode = projected.get("defaultMode", 0o644)
                    for source in projected.get("sources", []) or []:
                        if "secret" in source:
                            src = source["secret"]
                            data = self._object_data("Secret", src["name"], bool(src.get("optional")))
                            if data is not None:
                                self._write_items(root, data, src.get("items"), default_mode,
                                                  f"secret {src['name']}")
                        elif "configMap" in source:
                            src = source["configMap"]
                            data = self._object_data("ConfigMap", src["name"], bool(src.get("optional")))
                            if data is not None:
                                self._write_items(root, data, src.get("items"), default_mode,
                                                  f"configmap {src['name']}")
                        elif "downwardAPI" in source:
                            self._write_downward(root, source["downwardAPI"].get("items"), default_mode)
                        elif "serviceAccountToken" in source:
                            src = source["serviceAccountToken"]
                            token = self._token([src["audience"]] if src.get("audience") else None,
                                                int(src.get("expirationSeconds", 3600)))
                            self._write_file(root, src["path"], token.encode(), 0o600)
                elif "emptyDir" not in volume:
                    log.warning("%s/%s: volume %s of an unsupported kind is an empty folder",
                                self.namespace, self.name, name)
            paths[name] = root
        if self.spec.get("automountServiceAccountToken") is not False:
            server, ca = kubeconfig_cluster(self.agent.kubeconfig)
            account = self.spec.get("serviceAccountName") or "default"
            self.kubeconfig = write_kubeconfig(self.dir / "kubeconfig", server, ca, token=self._token(),
                                               user=f"system:serviceaccount:{self.namespace}:{account}")
        self.volume_paths = paths
        self.ports.save(self.dir / "ports.json")
        self.agent.hosts_files.add(self.hosts_file, self.namespace, self.hostname, self.spec.get("hostAliases"))
        self.sandbox_ready = True

    # --- processes -------------------------------------------------------------------------
    def container_env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []) or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._object_data("ConfigMap", ref["name"], bool(ref.get("optional")))
            else:
                ref = source["secretRef"]
                data = self._object_data("Secret", ref["name"], bool(ref.get("optional")))
            for key, value in (data or {}).items():
                if ENV_NAME.match(prefix + key):
                    env[prefix + key] = value.decode(errors="replace")
        for item in container.get("env", []) or []:
            name = item["name"]
            if "valueFrom" in item:
                source = item["valueFrom"]
                if "secretKeyRef" in source:
                    value = self._key("Secret", source["secretKeyRef"])
                elif "configMapKeyRef" in source:
                    value = self._key("ConfigMap", source["configMapKeyRef"])
                elif "fieldRef" in source:
                    value = self._field(source["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in source:
                    value = self._resource(container, source["resourceFieldRef"])
                else:
                    raise ConfigError(f"unsupported valueFrom in env {name}")
                if value is None:
                    continue
            else:
                value = expand_vars(item.get("value", ""), env)
            env[name] = value
        return env

    def start_container(self, run: ContainerRun) -> None:
        spec = run.spec
        self._objects.clear()  # see changed Secrets/ConfigMaps on a restart
        mounts = [(m["mountPath"], self.volume_paths.get(m["name"], self.dir / "volumes" / m["name"])
                   / m.get("subPath", "")) for m in spec.get("volumeMounts", []) or []]
        for _, local in mounts:
            if not local.exists():
                local.mkdir(parents=True, exist_ok=True)
        rewrite = PathRewriter(mounts)
        pod_env = self.container_env(spec)
        env = {k: os.environ[k] for k in BASE_ENV_NAMES + tuple(self.agent.pass_env) if k in os.environ}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env["HOSTNAME"] = self.name
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        env.update({k: self.ports.rewrite(rewrite(v)) for k, v in pod_env.items()})
        # Kubernetes: `command` replaces the image's ENTRYPOINT, `args` its CMD.
        command = spec.get("command") or self.agent.entrypoint
        argv = [self.ports.rewrite(rewrite(expand_vars(a, pod_env))) for a in command + (spec.get("args") or [])]
        cwd = self.agent.cwd
        if spec.get("workingDir"):
            local = Path(rewrite(spec["workingDir"]))
            if local.is_dir():
                cwd = local
        log_dir = self.dir / "logs" / run.name
        log_dir.mkdir(parents=True, exist_ok=True)
        if run.init:
            (log_dir / ".init").touch()
        log_path = log_dir / f"{run.restarts}.log"
        run.container_id = f"isdr-local://{self.uid[:8]}-{run.name}-{run.restarts}"
        run.started_at = now_rfc3339()
        run.restart_at = None
        run.exit_code = None
        if argv and Path(argv[0]).name in PYTHON_NAMES:
            argv[0] = sys.executable
        elif argv and "/" not in argv[0] and shutil.which(argv[0], path=env["PATH"]) is None:
            # The project's console scripts (e.g. `isdr`) work even when it is not pip-installed.
            target = self.agent.console_scripts.get(argv[0])
            if target:
                module, _, function = target.partition(":")
                argv = [sys.executable, "-c", f"import sys; sys.argv[0] = {argv[0]!r}; "
                        f"from {module} import {function} as main; sys.exit(main())", *argv[1:]]
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.agent.cwd), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as output:
            if not argv:
                output.write(b"node agent: the container has no command and the Dockerfile no ENTRYPOINT\n")
                self._terminated(run, 128, "StartError", "no command and no ENTRYPOINT")
                run.pending_exit = True
                return
            try:
                run.process = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=self._preexec())
            except OSError as exc:
                output.write(f"node agent: cannot start {argv[0]}: {exc}\n".encode())
                self._terminated(run, 128, "StartError", str(exc))
                run.pending_exit = True
                return
        (self.dir / f"{run.name}.pid").write_text(str(run.process.pid))
        run.state = {"running": {"startedAt": run.started_at}}
        if not run.init or run.sidecar:
            run.prober = self._prober(run, env, cwd)
            run.prober.start()
        log.info("%s/%s: started %s (pid %d): %s", self.namespace, self.name, run.name, run.process.pid,
                 " ".join(argv)[:300])

    def _preexec(self):
        sandbox = sandbox_preexec(self.hosts_file if self.agent.isolation else None, self.hostname)
        group = self.cgroup

        def preexec() -> None:
            join(group)
            sandbox()
        return preexec

    def _prober(self, run: ContainerRun, env: dict[str, str], cwd) -> ContainerProber:
        def run_exec(command: list[str], timeout: float) -> tuple[int, str]:
            result = subprocess.run([self.ports.rewrite(a) for a in command], cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                    preexec_fn=self._preexec())
            return result.returncode, (result.stdout + result.stderr).decode(errors="replace")[-1024:]

        def on_failure(kind: str, message: str) -> None:
            self.event(run.name, "Unhealthy", f"{kind} probe failed: {message}")

        return ContainerProber(
            run.spec, resolve_port=lambda port: self.ports.host_port(port, run.spec), run_exec=run_exec,
            on_change=self.probe_changed.set, on_failure=on_failure,
            kill=lambda message, process=run.process: self.kill_container(run, process, message))

    def kill_container(self, run: ContainerRun, process: subprocess.Popen, message: str) -> None:
        """What kubelet does to a container that failed its liveness (or startup) probe."""
        if process is None or process.poll() is not None:
            return
        self.event(run.name, "Killing", f"Container {run.name} {message}", kind="Normal")
        log.info("%s/%s: killing %s: %s", self.namespace, self.name, run.name, message)
        grace = min(float(self.spec.get("terminationGracePeriodSeconds", 30)), self.agent.max_grace)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def force() -> None:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        threading.Timer(grace, force).start()

    def event(self, container: str, reason: str, message: str, kind: str = "Warning") -> None:
        """Record an Event on the pod as kubelet does (repeats of one message count up)."""
        key = (container, reason, message)
        now = now_rfc3339()
        base = f"/api/v1/namespaces/{self.namespace}/events"
        try:
            known = self._events.get(key)
            if known is not None:
                name, count = known
                self.agent.rest.patch(f"{base}/{name}", {"count": count + 1, "lastTimestamp": now}, kind="merge")
                self._events[key] = (name, count + 1)
                return
            created = self.agent.rest.post(base, {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{self.name}.{uuid.uuid4().hex[:16]}", "namespace": self.namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": self.namespace,
                                   "name": self.name, "uid": self.uid, "fieldPath": f"spec.containers{{{container}}}"},
                "reason": reason, "message": message, "type": kind, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": "kubelet", "host": self.agent.node_name},
                "reportingComponent": "kubelet", "reportingInstance": self.agent.node_name})
            self._events[key] = (created["metadata"]["name"], 1)
        except Exception as exc:  # noqa: BLE001 - an Event is worth a try, not a failure
            log.debug("%s/%s: event %s not recorded: %r", self.namespace, self.name, reason, exc)

    def _terminated(self, run: ContainerRun, code: int, reason: str | None = None, message: str | None = None):
        if run.prober is not None:
            run.prober.stop()
            run.prober = None
        run.exit_code = code
        run.process = None
        state = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                 "startedAt": run.started_at, "finishedAt": now_rfc3339(), "containerID": run.container_id}
        if message:
            state["message"] = message
        run.state = {"terminated": state}
        try:
            (self.dir / f"{run.name}.pid").unlink()
        except FileNotFoundError:
            pass

    def _reap(self, run: ContainerRun) -> bool:
        """If run's process ended (or could not start), record it; returns True when it did."""
        if run.pending_exit:
            run.pending_exit = False
            return True
        if run.process is None or run.process.poll() is None:
            return False
        code = run.process.returncode
        if code < 0:
            code = 128 - code  # killed by a signal: 137 for SIGKILL, 143 for SIGTERM
        log.info("%s/%s: %s exited with %d", self.namespace, self.name, run.name, code)
        self._terminated(run, code)
        return True

    def _after_exit(self, run: ContainerRun, policy: str) -> None:
        restart = policy == "Always" or (policy == "OnFailure" and run.exit_code != 0)
        if not restart:
            run.done = True
            return
        delay = min(self.agent.restart_backoff * (2 ** run.restarts), self.agent.max_restart_backoff)
        run.last_state = run.state
        run.restart_at = time.monotonic() + delay
        run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off {delay:g}s restarting failed container={run.name} "
                                            f"pod={self.name}_{self.namespace}({self.uid})"}}

    def _maybe_restart(self, run: ContainerRun) -> bool:
        if run.restart_at is not None and time.monotonic() >= run.restart_at:
            run.restarts += 1
            self.start_container(run)
            return True
        return False

    def _stop_processes(self, runs: list[ContainerRun], grace: float) -> None:
        live = [r for r in runs if r.running]
        for run in live:
            try:
                os.killpg(run.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(r.process.poll() is None for r in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in live:
            if run.process.poll() is None:
                try:
                    os.killpg(run.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                run.process.wait()
            self._reap(run)
        for run in runs:
            if run.restart_at is not None or "waiting" in run.state:
                run.restart_at = None
                if "terminated" not in run.state:
                    run.state = run.last_state or {"terminated": {
                        "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now_rfc3339(),
                        "message": "The container could not be located when the pod was deleted."}}
            run.done = True

    def _grace(self) -> float:
        meta_grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        spec_grace = self.spec.get("terminationGracePeriodSeconds", 30)
        grace = meta_grace if meta_grace is not None else spec_grace
        return float(min(grace if grace is not None else 30, self.agent.max_grace))

    def _stopping(self) -> bool:
        return self.deleting.is_set() or self.agent.stopping.is_set()

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:  # noqa: BLE001
            log.exception("%s/%s: node agent error", self.namespace, self.name)
            self._stop_processes(self.inits + self.mains, 0)
        finally:
            self.agent.hosts_files.remove(self.hosts_file)
            self.agent.cgroups.remove(self.uid)
            self.agent.runner_finished(self)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Pending: sandbox and volumes (retried while Secrets/ConfigMaps/ServiceAccounts are missing).
        while True:
            if self._stopping():
                return self._finish()
            try:
                self.prepare_volumes()
                for run in self.mains:
                    run.state = {"waiting": {"reason": "PodInitializing" if self.inits else "ContainerCreating"}}
                break
            except ConfigError as exc:
                for run in self.inits + self.mains:
                    run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                self.report()
                log.info("%s/%s: waiting: %s", self.namespace, self.name, exc)
                self.deleting.wait(1.0)
        self.report()

        # init containers, in order (a sidecar, restartPolicy Always, is started and left running)
        policy = "Never" if self.restart_policy == "Never" else "OnFailure"
        for run in self.inits:
            while True:
                if self._stopping():
                    return self._finish()
                if run.restart_at is not None:
                    if not self._restart_when_due(run):
                        time.sleep(0.05)
                        continue
                    self.report()
                elif run.process is None and run.exit_code is None:
                    if not self._start_or_wait(run):
                        continue
                if run.sidecar and run.running:
                    break
                if not self._reap(run):
                    time.sleep(0.05)
                    continue
                if run.exit_code == 0 and not run.sidecar:
                    run.done = True
                    self.report()
                    break
                self._after_exit(run, "Always" if run.sidecar else policy)
                if run.done:  # failed under restartPolicy Never: the pod fails
                    self.phase = "Failed"
                    return self._finish(terminal_already=True)
                self.report()

        # main containers, together
        for run in self.mains:
            while not self._start_or_wait(run):
                if self._stopping():
                    return self._finish()
        self.phase = "Running"
        self.report()
        while True:
            if self._stopping():
                return self._finish()
            changed = False
            for run in self.mains:
                if self._reap(run):
                    self._after_exit(run, self.restart_policy)
                    changed = True
                elif run.restart_at is not None:
                    changed = self._restart_when_due(run) or changed
            for run in self.inits:
                if run.sidecar and self._reap(run):
                    self._after_exit(run, "Always")
                    changed = True
                elif run.sidecar and run.restart_at is not None:
                    changed = self._restart_when_due(run) or changed
            if all(run.done for run in self.mains):
                self.phase = "Succeeded" if all(r.exit_code == 0 for r in self.mains) else "Failed"
                return self._finish(terminal_already=True)
            if self.probe_changed.is_set():
                self.probe_changed.clear()
                changed = True
            if changed:
                self.report()
            self.deleting.wait(0.05)

    def _start_or_wait(self, run: ContainerRun) -> bool:
        """Start run; while something it needs is missing, say so and return False (to retry)."""
        try:
            self.start_container(run)
        except ConfigError as exc:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            self.report()
            self.deleting.wait(1.0)
            return False
        self.report()
        return True

    def _restart_when_due(self, run: ContainerRun) -> bool:
        try:
            return self._maybe_restart(run)
        except ConfigError as exc:
            self._terminated(run, 128, "CreateContainerConfigError", str(exc))
            run.pending_exit = True
            return True

    def _finish(self, terminal_already: bool = False) -> None:
        """Stop whatever still runs, report the terminal phase, and complete a requested deletion."""
        grace = 2.0 if self.agent.stopping.is_set() and not self.deleting.is_set() else self._grace()
        self._stop_processes(self.inits + self.mains, grace)
        if self.agent.stopping.is_set() and not self.deleting.is_set():
            return  # the agent goes away; like a kubelet that stops, it leaves the pods as they are
        if not terminal_already:
            started = [r for r in self.mains if r.exit_code is not None]
            ok = bool(started) and all(r.exit_code == 0 for r in self.mains)
            self.phase = "Succeeded" if ok else "Failed"
        self.report()
        log.info("%s/%s: %s", self.namespace, self.name, self.phase)
        if self.deleting.is_set() and not self.gone.is_set():
            try:
                self.agent.rest.delete(self.path, {"apiVersion": "v1", "kind": "DeleteOptions",
                                                   "gracePeriodSeconds": 0,
                                                   "preconditions": {"uid": self.uid}}, ok_missing=True)
            except KubeError as exc:
                if exc.status != 409:
                    log.warning("%s/%s: final delete failed: %s", self.namespace, self.name, exc)


# --------------------------------------------------------------------------------------------------


class NodeAgent:
    def __init__(self, kubeconfig, work_dir, node_name: str = DEFAULT_NODE_NAME, pvc_dir=None, cwd=None,
                 pass_env=(), restart_backoff: float = 10.0, max_restart_backoff: float = 300.0,
                 max_grace: float = 10.0, heartbeat: float = 10.0, kubelet_tls: dict | None = None,
                 dockerfile: Path | None = None):
        self.kubeconfig = Path(kubeconfig)
        # {"cert": ..., "key": ..., "client_ca": ...}: serve kubelet's log endpoint (kubectl logs)
        self.kubelet_tls = kubelet_tls
        self.log_server = None
        self.kubelet_port = 0
        # The image's ENTRYPOINT, for containers without a command (as a container runtime does).
        self.entrypoint = image_entrypoint(dockerfile or REPO_ROOT / "Dockerfile")
        self.work_dir = Path(work_dir).resolve()
        self.node_name = node_name
        self.pvc_dir = Path(pvc_dir).resolve() if pvc_dir else self.work_dir / "pvc"
        self.cwd = Path(cwd or REPO_ROOT)
        self.pass_env = list(pass_env)
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.max_grace = max_grace
        self.heartbeat = heartbeat
        self.console_scripts = console_scripts(self.cwd)
        self.memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # The pods' share of the CPU: the node's allocatable CPU, split by the pods' requests.
        self.cgroups = PodCgroups(f"isdr-kubepods-{os.getpid()}", (os.cpu_count() or 1) * 1000)
        self.rest = KubeREST(self.kubeconfig)
        self.watch_rest = KubeREST(self.kubeconfig)  # its own connection for the long-running watch
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.runners: dict[str, PodRunner] = {}
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self.node_uid = ""
        self.registered_at = now_rfc3339()
        # The pod network (pod_network.py): per-pod hosts files and the Services' forwarders.
        self.isolation = False  # decided in start(): can pods get their own /etc/hosts here?
        self.hosts_files = HostsFiles()
        self.services = ServiceProxy(self.endpoints, self.work_dir / "services.json",
                                     on_change=self.hosts_files.services_changed)
        self.services_rest = KubeREST(self.kubeconfig)

    # --- node ------------------------------------------------------------------------------
    def _node_conditions(self) -> list[dict]:
        now = now_rfc3339()
        base = {"lastHeartbeatTime": now, "lastTransitionTime": self.registered_at}
        return [
            dict(base, type="MemoryPressure", status="False", reason="KubeletHasSufficientMemory",
                 message="kubelet has sufficient memory available"),
            dict(base, type="DiskPressure", status="False", reason="KubeletHasNoDiskPressure",
                 message="kubelet has no disk pressure"),
            dict(base, type="PIDPressure", status="False", reason="KubeletHasSufficientPID",
                 message="kubelet has sufficient PID available"),
            dict(base, type="Ready", status="True", reason="KubeletReady",
                 message="isdr local node agent is posting ready status"),
        ]

    def _node_status(self) -> dict:
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{self.memory_bytes // 1024}Ki", "pods": "110",
                    "ephemeral-storage": "100Gi"}
        uname = platform.uname()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": self._node_conditions(),
            "addresses": [{"type": "InternalIP", "address": LOCAL_IP}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name)),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": uname.release,
                "osImage": "isdr local node agent",
                "containerRuntimeVersion": "isdr-local://1",
                "kubeletVersion": K8S_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            },
        }

    def register_node(self) -> None:
        path = f"/api/v1/nodes/{self.node_name}"
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {
                "kubernetes.io/hostname": self.node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": self._node_status()["nodeInfo"]["architecture"],
                "isdr.dev/local-node-agent": "true",
            }},
            "spec": {},
            "status": self._node_status(),
        }
        node = self.rest.get(path, ok_missing=True)
        if node is None:
            node = self.rest.post("/api/v1/nodes", body)
        node = self.rest.patch(path + "/status", {"status": self._node_status()})
        self.node_uid = node["metadata"]["uid"]
        self._renew_lease()
        log.info("registered node %s", self.node_name)

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        renew = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        lease = self.rest.get(path, ok_missing=True)
        if lease is None:
            self.rest.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self.node_uid}]},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": renew}})
        else:
            self.rest.patch(path, {"spec": {"renewTime": renew}}, kind="merge")

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.heartbeat):
            try:
                self._renew_lease()
                self.rest.patch(f"/api/v1/nodes/{self.node_name}/status",
                                {"status": {"conditions": self._node_conditions()}})
            except Exception as exc:  # noqa: BLE001
                if not self.stopping.is_set():
                    log.warning("heartbeat failed: %r", exc)

    # --- pods ------------------------------------------------------------------------------
    def bind(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            self.rest.post(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", {
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
            log.info("%s/%s: bound to %s", meta["namespace"], meta["name"], self.node_name)
        except KubeError as exc:
            if exc.status not in (404, 409):
                log.warning("%s/%s: binding failed: %s", meta["namespace"], meta["name"], exc)

    def handle(self, event: str, pod: dict) -> None:
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        uid = meta["uid"]
        with self.lock:
            runner = self.runners.get(uid)
            if event == "DELETED":
                if runner is not None:
                    runner.vanished()
                return
            node = spec.get("nodeName")
            if not node:
                if (not meta.get("deletionTimestamp") and status.get("phase", "Pending") == "Pending"
                        and spec.get("schedulerName", "default-scheduler") == "default-scheduler"):
                    self.bind(pod)
                return
            if node != self.node_name:
                return
            if runner is not None:
                runner.update(pod)
                return
            if uid in self.finished or self.stopping.is_set():
                return
            if status.get("phase") in ("Succeeded", "Failed"):
                self.finished.add(uid)
                return
            runner = PodRunner(self, pod)
            self.runners[uid] = runner
        runner.start()

    def endpoints(self, namespace: str, selector: dict, include_not_ready: bool) -> list[Endpoint]:
        """The pods of this node a Service with `selector` in `namespace` forwards to."""
        with self.lock:
            runners = [r for r in self.runners.values() if r.namespace == namespace]
        found = (r.endpoint(selector, include_not_ready) for r in runners)
        return [endpoint for endpoint in found if endpoint is not None]

    def runner_finished(self, runner: PodRunner) -> None:
        with self.lock:
            self.runners.pop(runner.uid, None)
            self.finished.add(runner.uid)

    def _watch_loop(self) -> None:
        def listed(present: set[str]) -> None:
            with self.lock:
                lost = [r for uid, r in self.runners.items() if uid not in present]
            for runner in lost:
                runner.vanished()

        list_and_watch(self.rest, self.watch_rest, "/api/v1/pods", self.handle, self.stopping, listed,
                       what="pod watch")

    # --- running ---------------------------------------------------------------------------
    def start(self) -> None:
        """Register the node and start the watch and heartbeat threads; returns at once."""
        (self.work_dir / "pods").mkdir(parents=True, exist_ok=True)
        self.pvc_dir.mkdir(parents=True, exist_ok=True)
        if self.kubelet_tls:
            from tests.support.kubelet_logs import LogServer

            self.log_server = LogServer(self._log_runs, self._container_running, self.kubelet_tls["cert"],
                                        self.kubelet_tls["key"], self.kubelet_tls["client_ca"])
            self.log_server.start()
            self.kubelet_port = self.log_server.port
        self.isolation = isolation_supported(self.work_dir)
        if not self.isolation:
            log.warning("pods cannot get their own /etc/hosts here (mount namespaces need CAP_SYS_ADMIN): "
                        "Service names do not resolve in pods")
        self.register_node()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_loop, name="pod-watch", daemon=True).start()
        threading.Thread(target=list_and_watch, name="service-watch", daemon=True, kwargs=dict(
            rest=self.rest, watch_rest=self.services_rest, path="/api/v1/services", handle=self.services.handle,
            stopping=self.stopping, listed=self.services.forget_missing, what="service watch")).start()
        self.ready.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every pod process (SIGTERM, then SIGKILL after 2s) and the threads."""
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.join(timeout)
        self.services.stop()
        if self.log_server is not None:
            self.log_server.stop()
        self.cgroups.close()

    # --- kubelet's log endpoint ------------------------------------------------------------
    def _log_runs(self, namespace: str, pod: str, container: str) -> list[Path]:
        try:
            folder = pod_dir(namespace, pod, self.work_dir) / "logs" / container
        except FileNotFoundError:
            return []
        return sorted(folder.glob("*.log"), key=lambda p: int(p.stem))

    def _container_running(self, namespace: str, pod: str, container: str) -> bool:
        try:
            return (pod_dir(namespace, pod, self.work_dir) / f"{container}.pid").exists()
        except FileNotFoundError:
            return False


class NodeAgentProcess:
    """The node agent as a child process (`python -m tests.support.node_agent`), for the fixture."""

    def __init__(self, kubeconfig, work_dir, log_path, node_name: str = DEFAULT_NODE_NAME, pvc_dir=None,
                 extra_args=()):
        self.kubeconfig = Path(kubeconfig)
        self.work_dir = Path(work_dir)
        self.pvc_dir = Path(pvc_dir) if pvc_dir else self.work_dir / "pvc"
        self.node_name = node_name
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.process = None

    @classmethod
    def attach(cls, work_dir) -> "NodeAgentProcess":
        """A handle on an agent started elsewhere (`python -m tests.support.node_agent --work-dir ...`)."""
        info = json.loads((Path(work_dir) / "agent.json").read_text())
        handle = cls(info["kubeconfig"], work_dir, log_path=Path(work_dir) / "agent.log",
                     node_name=info["node_name"], pvc_dir=info["pvc_dir"])
        return handle

    def start(self, timeout: float = 30.0) -> None:
        from tests.support.processes import ManagedProcess

        ready_file = self.work_dir / "ready"
        if ready_file.exists():
            ready_file.unlink()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.process = ManagedProcess(
            [sys.executable, "-m", "tests.support.node_agent", "--kubeconfig", str(self.kubeconfig),
             "--work-dir", str(self.work_dir), "--pvc-dir", str(self.pvc_dir), "--node-name", self.node_name,
             "--ready-file", str(ready_file), *self.extra_args],
            self.log_path, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while not ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"node agent exited with {self.process.returncode}:\n{self.process.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"node agent not ready after {timeout}s:\n{self.process.output()}")
            time.sleep(0.05)
        set_default_work_dir(self.work_dir)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)
        if _default_work_dir == self.work_dir:
            set_default_work_dir(None)

    def pod_log(self, namespace: str, pod_name: str, container: str | None = None, previous: bool = False) -> str:
        return pod_log(namespace, pod_name, container, previous, work_dir=self.work_dir)

    def pod_pids(self, namespace: str, pod_name: str) -> dict[str, int]:
        return pod_pids(namespace, pod_name, work_dir=self.work_dir)

    def pvc_path(self, claim_name: str, namespace: str) -> Path:
        return pvc_path(claim_name, namespace, self.pvc_dir)

    def pod_port(self, namespace: str, pod_name: str, port: int | str) -> int:
        return pod_port(namespace, pod_name, port, work_dir=self.work_dir)

    def service_address(self, namespace: str, name: str) -> str:
        return service_address(namespace, name, work_dir=self.work_dir)

    @property
    def service_names_resolve(self) -> bool:
        return service_names_resolve(self.work_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.node_agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig of the cluster")
    parser.add_argument("--work-dir", required=True, help="where pod folders, volumes and logs go")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--pvc-dir", help="folder for persistentVolumeClaim volumes (default WORK_DIR/pvc)")
    parser.add_argument("--cwd", help="working directory of containers without workingDir (default: the repo)")
    parser.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                        help="pass this variable of the agent's environment to every container")
    parser.add_argument("--restart-backoff", type=float, default=10.0, help="first restart delay, doubling")
    parser.add_argument("--max-grace", type=float, default=10.0, help="cap on termination grace periods")
    parser.add_argument("--ready-file", help="touched once the node is registered")
    parser.add_argument("--kubelet-cert", help="serving certificate of the kubelet log endpoint (kubectl logs)")
    parser.add_argument("--kubelet-key", help="its key")
    parser.add_argument("--kubelet-client-ca", help="CA of the API server's kubelet client certificate")
    parser.add_argument("--dockerfile", help="whose ENTRYPOINT runs containers without a command "
                        "(default: the repository's Dockerfile)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    kubelet_tls = None
    if args.kubelet_cert:
        kubelet_tls = {"cert": args.kubelet_cert, "key": args.kubelet_key, "client_ca": args.kubelet_client_ca}
    agent = NodeAgent(args.kubeconfig, args.work_dir, node_name=args.node_name, pvc_dir=args.pvc_dir, cwd=args.cwd,
                      pass_env=args.pass_env, restart_backoff=args.restart_backoff, max_grace=args.max_grace,
                      kubelet_tls=kubelet_tls, dockerfile=Path(args.dockerfile) if args.dockerfile else None)
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.start()
    (agent.work_dir / "agent.json").write_text(json.dumps(
        {"pid": os.getpid(), "node_name": agent.node_name, "pvc_dir": str(agent.pvc_dir),
         "kubeconfig": str(Path(args.kubeconfig).resolve()), "service_names": agent.isolation}))
    if args.ready_file:
        Path(args.ready_file).write_text(str(os.getpid()))
    print(f"node agent: node {agent.node_name} ready; pods in {agent.work_dir / 'pods'}", file=sys.stderr, flush=True)
    while not agent.stopping.wait(0.5):
        pass
    agent.stop()
    log.info("node agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
