"""The node agent gives pods what their network namespace, kube-proxy and the cluster DNS give them.

Pods are local processes on the host's network, so the agent moves every declared container port
to a free host port (two pods, or two test sessions, can both listen on "8080"), runs kubelet's
probes against the moved ports, forwards each Service from an address of its own to its Ready
pods, and gives each pod an /etc/hosts in which the Services' names resolve.
"""

from __future__ import annotations

import textwrap
import urllib.request

import pytest

from tests.support.kube import wait_until
from tests.support.processes import missing

pytestmark = pytest.mark.kube

# A web server on $PORT; /ready answers 503 while the file $FLAG is missing.
SERVER = textwrap.dedent("""
    import http.server, os, pathlib, socket
    flag = pathlib.Path(os.environ.get("FLAG", "/nonexistent"))
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path != "/ready" or flag.exists()
            body = ("served by " + socket.gethostname() + "\\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    print("listening on", os.environ["PORT"], flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
""")


@pytest.fixture
def agent(node_agent):
    if node_agent is None:
        pytest.skip("needs the local node agent")
    return node_agent


def web_pod(name: str, labels: dict | None = None, flag_dir: str | None = None, **probes) -> dict:
    container = {"name": "web", "image": "isdr:test", "command": ["python", "-c", SERVER],
                 "env": [{"name": "PORT", "value": "8080"}],
                 "ports": [{"name": "http", "containerPort": 8080}], **probes}
    spec: dict = {"restartPolicy": "Always", "terminationGracePeriodSeconds": 1, "containers": [container]}
    if flag_dir:
        container["env"].append({"name": "FLAG", "value": "/flags/ready"})
        container["volumeMounts"] = [{"name": "flags", "mountPath": "/flags"}]
        spec["volumes"] = [{"name": "flags", "hostPath": {"path": flag_dir}}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def pod_status(cluster, namespace: str, name: str) -> dict:
    return cluster.rest.get(f"/api/v1/namespaces/{namespace}/pods/{name}").get("status") or {}


def is_ready(cluster, namespace: str, name: str) -> bool:
    conditions = pod_status(cluster, namespace, name).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def test_two_pods_declaring_the_same_port_each_get_one_of_their_own(kube_cluster, agent, kube_namespace):
    for name in ("web-a", "web-b"):
        kube_cluster.rest.post(f"/api/v1/namespaces/{kube_namespace}/pods", web_pod(name))
    ports = {}
    for name in ("web-a", "web-b"):
        wait_until(lambda name=name: "listening" in agent.pod_log(kube_namespace, name), 60, what=f"{name} to listen")
        ports[name] = agent.pod_port(kube_namespace, name, 8080)
        assert agent.pod_port(kube_namespace, name, "http") == ports[name]
        log = agent.pod_log(kube_namespace, name)
        assert f"listening on {ports[name]}" in log, "the container's PORT=8080 is its host port"
    assert ports["web-a"] != ports["web-b"]
    for name, port in ports.items():
        served = get(port)
        if agent.service_names_resolve:  # the pod's own UTS namespace: its hostname is its name
            assert served == f"served by {name}\n"


def test_readiness_probe_decides_ready_and_failures_are_events(kube_cluster, agent, kube_namespace, tmp_path):
    flag = tmp_path / "flags"
    flag.mkdir()
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 2}
    kube_cluster.rest.post(f"/api/v1/namespaces/{kube_namespace}/pods",
                           web_pod("gated", flag_dir=str(flag), readinessProbe=probe))
    wait_until(lambda: pod_status(kube_cluster, kube_namespace, "gated").get("phase") == "Running", 60,
               what="the pod to run")
    wait_until(lambda: any(e["reason"] == "Unhealthy" for e in kube_cluster.rest.get(
        f"/api/v1/namespaces/{kube_namespace}/events")["items"]), 30, what="a probe failure Event")
    assert not is_ready(kube_cluster, kube_namespace, "gated")
    (container,) = pod_status(kube_cluster, kube_namespace, "gated")["containerStatuses"]
    assert container["started"] is True and container["ready"] is False

    (flag / "ready").touch()
    wait_until(lambda: is_ready(kube_cluster, kube_namespace, "gated"), 30, what="Ready after the probe passes")
    (flag / "ready").unlink()
    wait_until(lambda: not is_ready(kube_cluster, kube_namespace, "gated"), 30, what="NotReady again")
    described = kube_cluster.kubectl("-n", kube_namespace, "describe", "pod", "gated").stdout
    assert "Readiness probe failed: HTTP probe failed with statuscode: 503" in described


def test_a_failing_liveness_probe_restarts_the_container(kube_cluster, agent, kube_namespace):
    probe = {"tcpSocket": {"port": 8081}, "periodSeconds": 1, "failureThreshold": 2}  # nothing listens on 8081
    kube_cluster.rest.post(f"/api/v1/namespaces/{kube_namespace}/pods", web_pod("doomed", livenessProbe=probe))

    def restarted():
        statuses = pod_status(kube_cluster, kube_namespace, "doomed").get("containerStatuses") or [{}]
        return statuses[0].get("restartCount", 0) >= 1 and statuses[0]

    status = wait_until(restarted, 60, what="the container to be restarted")
    assert status["lastState"]["terminated"]["exitCode"] in (137, 143)
    described = kube_cluster.kubectl("-n", kube_namespace, "describe", "pod", "doomed").stdout
    assert "Liveness probe failed: dial tcp 127.0.0.1:8081: connect: connection refused" in described
    assert "Container web failed liveness probe, will be restarted" in described


def test_a_service_name_resolves_in_pods_and_forwards_to_a_ready_pod(kube_cluster, agent, kube_namespace, tmp_path):
    if not agent.service_names_resolve:
        missing("mount namespaces for the pods' own /etc/hosts (the node agent needs to run as root)")
    ns = kube_namespace
    kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]}})
    flag = tmp_path / "flags"
    flag.mkdir()
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}
    kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/pods",
                           web_pod("backend", {"app": "web"}, flag_dir=str(flag), readinessProbe=probe))
    wait_until(lambda: "listening" in agent.pod_log(ns, "backend"), 60, what="the backend to listen")

    client = textwrap.dedent(f"""
        import urllib.request
        for url in ("http://web:8000/", "http://web.{ns}.svc:8000/", "http://web.{ns}.svc.cluster.local:8000/"):
            try:
                print(url, urllib.request.urlopen(url, timeout=10).read().decode().strip(), flush=True)
            except OSError as exc:
                print(url, "failed:", type(exc).__name__, flush=True)
    """)

    def run_client(name: str) -> str:
        kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "client", "image": "isdr:test", "command": ["python", "-c", client]}]}})
        wait_until(lambda: pod_status(kube_cluster, ns, name).get("phase") == "Succeeded", 60,
                   what=f"{name} to finish")
        return kube_cluster.kubectl("-n", ns, "logs", name).stdout

    # Not Ready: no endpoint, the connection is reset (as kube-proxy rejects it).
    assert run_client("before").count("failed:") == 3
    (flag / "ready").touch()
    wait_until(lambda: is_ready(kube_cluster, ns, "backend"), 30, what="the backend to be Ready")
    output = run_client("after")
    assert output.count("served by backend") == 3, output
    # The test itself reaches the Service at its address (what its cluster IP is on a cluster).
    address = agent.service_address(ns, "web")
    with urllib.request.urlopen(f"http://{address}:8000/", timeout=10) as response:
        assert response.read().decode() == "served by backend\n"
