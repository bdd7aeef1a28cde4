"""The node agent runs pods as they are, and serves kubelet's log endpoint.

A container without `command` runs the image's ENTRYPOINT (read from the Dockerfile) with its
`args`, as a container runtime would; `kubectl logs` for a pod, a Job and a Deployment goes
through the real API server to the agent's log endpoint (TLS both ways, as with kubelet).
"""

from __future__ import annotations

import pytest

from tests.support.kube import wait_until

pytestmark = pytest.mark.kube


def pod(name: str, container: dict, restart: str = "Never") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart, "containers": [container]}}


@pytest.fixture
def agent(node_agent):
    if node_agent is None:
        pytest.skip("needs the local node agent")
    return node_agent


def test_a_container_without_command_runs_the_images_entrypoint_with_its_args(kube_cluster, agent, kube_namespace):
    kube_cluster.rest.post(f"/api/v1/namespaces/{kube_namespace}/pods",
                           pod("version", {"name": "main", "image": "isdr:test", "args": ["--version"]}))
    wait_until(lambda: kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/pods/version")
               ["status"].get("phase") == "Succeeded", 60, what="the pod to succeed")
    logs = kube_cluster.kubectl("-n", kube_namespace, "logs", "version").stdout
    assert logs.strip() == "isdr 0.1.0"


def test_kubectl_logs_goes_through_the_api_server_to_the_agent(kube_cluster, agent, kube_namespace):
    script = "import sys\nfor i in range(5): print('line', i)\nsys.stdout.flush()\n"
    kube_cluster.rest.post(f"/api/v1/namespaces/{kube_namespace}/pods",
                           pod("talk", {"name": "main", "image": "isdr:test", "command": ["python", "-c", script]}))
    wait_until(lambda: kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/pods/talk")
               ["status"].get("phase") == "Succeeded", 60, what="the pod to succeed")
    assert kube_cluster.kubectl("-n", kube_namespace, "logs", "talk").stdout.splitlines() == [
        f"line {i}" for i in range(5)]
    assert kube_cluster.kubectl("-n", kube_namespace, "logs", "talk", "--tail=2").stdout.splitlines() == [
        "line 3", "line 4"]
    assert kube_cluster.kubectl("-n", kube_namespace, "logs", "talk", "--limit-bytes=6").stdout == "line 0"
    assert kube_cluster.kubectl("-n", kube_namespace, "logs", "talk", "-f").stdout.count("line") == 5
    missing = kube_cluster.kubectl("-n", kube_namespace, "logs", "talk", "--previous", check=False)
    assert missing.returncode != 0 and "previous terminated container" in missing.stderr


def test_kubectl_logs_of_a_job_and_of_a_deployment(kube_cluster, agent, kube_namespace):
    labels = {"app": "echoer"}
    kube_cluster.rest.post(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs", {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "main", "image": "isdr:test", "command": ["python", "-c", "print('job done')"]}]}}}})
    kube_cluster.rest.post(f"/apis/apps/v1/namespaces/{kube_namespace}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "server"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels}, "spec": {"containers": [{"name": "main", "image": "isdr:test", "command": [
                "python", "-c", "import time; print('serving', flush=True); time.sleep(600)"]}]}}}})
    kube_cluster.wait_job_condition(kube_namespace, "once", "Complete", timeout=60)
    assert kube_cluster.kubectl("-n", kube_namespace, "logs", "job/once").stdout.strip() == "job done"
    wait_until(lambda: "serving" in kube_cluster.kubectl("-n", kube_namespace, "logs", "deployment/server",
                                                         check=False).stdout, 60, what="the Deployment's log")
