"""Smoke tests: the control plane the tests get is a real one (API server validation, the Job and TTL
controllers, garbage collection, helm and kubectl), and the local node agent runs pods as kubelet would."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.support.kube import K8S_VERSION, job_condition, wait_until

pytestmark = pytest.mark.kube

CHART = Path(__file__).parent / "charts" / "isdr-smoke"
GROUP = "smoke.isdr.test"


def python_job(name: str, code: str, backoff_limit: int = 0, **spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            **spec,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "python:3.11-slim",
                                "command": ["python", "-c", textwrap.dedent(code)]}],
            }},
        },
    }


def create_job(cluster, namespace: str, job: dict) -> dict:
    return cluster.rest.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", job)


def needs_local_agent(agent) -> None:
    if agent is None:
        pytest.skip("needs the local node agent (a real cluster's kubelet runs the pods here)")


# --------------------------------------------------------------------------------------------------
# the API server


def test_api_server_reports_the_pinned_version(kube_cluster):
    version = kube_cluster.rest.get("/version")
    if not kube_cluster.existing:
        assert version["gitVersion"] == K8S_VERSION
    assert version["major"] == "1"


@pytest.fixture
def gadget_crd(kube_cluster):
    """A small test-only CRD (not the project's crds/)."""
    name = f"gadgets.{GROUP}"
    body = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "colour": {"type": "string", "enum": ["red", "blue"]},
                        },
                    }},
                }},
            }],
        },
    }
    kube_cluster.apiextensions.create_custom_resource_definition(body=body)
    kube_cluster.wait_crd_established(name)
    yield name
    kube_cluster.apiextensions.delete_custom_resource_definition(name=name)


def test_crd_is_served_and_schema_is_enforced(kube_cluster, kube_namespace, gadget_crd):
    custom = kube_cluster.custom

    def gadget(name, spec):
        return {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": spec}

    created = custom.create_namespaced_custom_object(GROUP, "v1", kube_namespace, "gadgets",
                                                     gadget("good", {"size": 3, "colour": "red"}))
    assert created["metadata"]["uid"]
    listed = custom.list_namespaced_custom_object(GROUP, "v1", kube_namespace, "gadgets")
    assert [item["metadata"]["name"] for item in listed["items"]] == ["good"]

    for bad_spec in ({"size": 11}, {"size": "big"}, {"colour": "red"}, {"size": 2, "colour": "green"}):
        with pytest.raises(ApiException) as error:
            custom.create_namespaced_custom_object(GROUP, "v1", kube_namespace, "gadgets", gadget("bad", bad_spec))
        assert error.value.status == 422, bad_spec
        assert "Invalid" in error.value.body or "invalid" in error.value.body

    # kubectl sees the new resource type through discovery too.
    out = kube_cluster.kubectl("get", "gadgets", "-n", kube_namespace, "-o", "name").stdout
    assert out.strip() == f"gadget.{GROUP}/good"


def test_project_crds_are_installed(kube_cluster):
    from tests.support.kube import CRDS_DIR, load_manifests

    documents = load_manifests(CRDS_DIR) if CRDS_DIR.is_dir() else []
    expected = {d["metadata"]["name"] for d in documents if d.get("kind") == "CustomResourceDefinition"}
    served = {item["metadata"]["name"] for item in
              kube_cluster.rest.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]}
    assert expected <= served


# --------------------------------------------------------------------------------------------------
# the Job controller, the TTL controller and the node agent


def test_job_whose_pod_exits_0_completes(kube_cluster, node_agent, kube_namespace):
    create_job(kube_cluster, kube_namespace, python_job("ok", "print('hello from the job')"))
    job = kube_cluster.wait_job_condition(kube_namespace, "ok", ("Complete", "Failed"), timeout=90)
    assert job_condition(job, "Complete"), job["status"]
    assert job["status"]["succeeded"] == 1
    [pod] = kube_cluster.job_pods(kube_namespace, "ok")
    assert pod["status"]["phase"] == "Succeeded"
    [container] = pod["status"]["containerStatuses"]
    terminated = container["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["startedAt"] <= terminated["finishedAt"]
    assert "hello from the job" in kube_cluster.pod_log(kube_namespace, pod["metadata"]["name"])


def test_job_whose_pod_exits_1_is_retried_then_fails(kube_cluster, node_agent, kube_namespace):
    create_job(kube_cluster, kube_namespace,
               python_job("bad", "import sys; print('failing on purpose'); sys.exit(1)", backoff_limit=1))
    job = kube_cluster.wait_job_condition(kube_namespace, "bad", ("Complete", "Failed"), timeout=120)
    failed = job_condition(job, "Failed")
    assert failed and failed["reason"] == "BackoffLimitExceeded", job["status"]
    assert job["status"]["failed"] == 2  # the first try and one retry (backoffLimit 1)
    pods = kube_cluster.job_pods(kube_namespace, "bad")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Failed"
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 1
        assert "failing on purpose" in kube_cluster.pod_log(kube_namespace, pod["metadata"]["name"])


def test_pod_runs_the_project_console_script(kube_cluster, node_agent, kube_namespace):
    """`isdr ...` as a container command runs the project's CLI (installed or not)."""
    needs_local_agent(node_agent)
    job = python_job("cli", "")
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["isdr", "--help"]
    create_job(kube_cluster, kube_namespace, job)
    job = kube_cluster.wait_job_condition(kube_namespace, "cli", ("Complete", "Failed"), timeout=90)
    [pod] = kube_cluster.job_pods(kube_namespace, "cli")
    output = kube_cluster.pod_log(kube_namespace, pod["metadata"]["name"])
    assert job_condition(job, "Complete"), output
    assert "usage: isdr" in output


def test_ttl_after_finished_removes_the_job_and_its_pods(kube_cluster, node_agent, kube_namespace):
    create_job(kube_cluster, kube_namespace, python_job("short-lived", "print('bye')", ttlSecondsAfterFinished=1))
    wait_until(lambda: kube_cluster.rest.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/short-lived",
                                             ok_missing=True) is None,
               timeout=90, interval=0.5, what="the TTL controller to delete the Job")
    wait_until(lambda: not kube_cluster.job_pods(kube_namespace, "short-lived"), timeout=60, interval=0.5,
               what="the garbage collector to delete the Job's pods")


def _running_pid(kube_cluster, node_agent, namespace: str, job: str) -> tuple[str, int]:
    def running():
        for pod in kube_cluster.job_pods(namespace, job):
            if pod["status"].get("phase") == "Running":
                pids = node_agent.pod_pids(namespace, pod["metadata"]["name"])
                if pids.get("main"):
                    return pod["metadata"]["name"], pids["main"]
        return None

    return wait_until(running, timeout=60, what=f"a running pod of Job {job}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_of_the_pod_process_fails_the_job(kube_cluster, node_agent, kube_namespace):
    needs_local_agent(node_agent)
    create_job(kube_cluster, kube_namespace,
               python_job("victim", "import time; print('up', flush=True); time.sleep(600)"))
    pod_name, pid = _running_pid(kube_cluster, node_agent, kube_namespace, "victim")
    os.kill(pid, signal.SIGKILL)
    job = kube_cluster.wait_job_condition(kube_namespace, "victim", ("Complete", "Failed"), timeout=60)
    assert job_condition(job, "Failed"), job["status"]
    pod = kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/pods/{pod_name}")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137 and terminated["reason"] == "Error"


def test_active_deadline_kills_the_pod_process(kube_cluster, node_agent, kube_namespace):
    needs_local_agent(node_agent)
    create_job(kube_cluster, kube_namespace,
               python_job("slow", "import time; time.sleep(600)", activeDeadlineSeconds=3))
    pod_name, pid = _running_pid(kube_cluster, node_agent, kube_namespace, "slow")
    job = kube_cluster.wait_job_condition(kube_namespace, "slow", ("Complete", "Failed"), timeout=60)
    assert job_condition(job, "Failed")["reason"] == "DeadlineExceeded"
    wait_until(lambda: not _alive(pid), timeout=30, what="the deleted pod's process to end")
    wait_until(lambda: kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/pods/{pod_name}",
                                             ok_missing=True) is None,
               timeout=30, what="the deleted pod to be removed")


def test_pod_gets_env_volumes_and_service_account_credentials(kube_cluster, node_agent, kube_namespace):
    needs_local_agent(node_agent)
    ns = kube_namespace
    rest = kube_cluster.rest
    rest.post(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"password": "s3cret", "token": "tkn"}})
    rest.post(f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"greeting": "hi", "config.yaml": "answer: 42\n"}})
    rest.post(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    script = textwrap.dedent("""
        import json, os, pathlib
        from kubernetes import client, config
        config.load_kube_config()
        try:
            client.CoreV1Api().list_namespaced_secret(os.environ["POD_NAMESPACE"])
            rbac = "allowed"
        except client.ApiException as exc:
            rbac = exc.status
        pathlib.Path("/scratch/tmp.txt").write_text("scratch")
        pathlib.Path("/data/out/result.txt").parent.mkdir(exist_ok=True)
        pathlib.Path("/data/out/result.txt").write_text("written by the pod")
        print(json.dumps({
            "env": {k: os.environ.get(k) for k in ("PLAIN", "EXPANDED", "FROM_SECRET", "FROM_CM", "POD_NAME",
                                                   "POD_NAMESPACE", "CM_greeting", "S_token", "DATA_DIR")},
            "secret": open("/etc/creds/password").read(),
            "config": open("/etc/settings/config.yaml").read(),
            "scratch": open("/scratch/tmp.txt").read(),
            "rbac": rbac,
        }))
    """)
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inspect", "labels": {"app": "inspect"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "python:3.11-slim",
                "command": ["python", "-c", script],
                "env": [
                    {"name": "PLAIN", "value": "plain"},
                    {"name": "EXPANDED", "value": "$(PLAIN)-expanded"},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "DATA_DIR", "value": "/data/out"},
                ],
                "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CM_"},
                            {"secretRef": {"name": "creds"}, "prefix": "S_"}],
                "volumeMounts": [
                    {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                    {"name": "settings", "mountPath": "/etc/settings"},
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "data", "mountPath": "/data"},
                ],
            }],
            "volumes": [
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            ],
        },
    }
    rest.post(f"/api/v1/namespaces/{ns}/pods", pod)
    wait_until(lambda: rest.get(f"/api/v1/namespaces/{ns}/pods/inspect")["status"].get("phase")
               in ("Succeeded", "Failed"), timeout=60, what="the pod to finish")
    log = kube_cluster.pod_log(ns, "inspect")
    final = rest.get(f"/api/v1/namespaces/{ns}/pods/inspect")
    assert final["status"]["phase"] == "Succeeded", log
    assert final["spec"]["nodeName"] == node_agent.node_name
    report = json.loads(log.strip().splitlines()[-1])
    assert report["env"] == {
        "PLAIN": "plain", "EXPANDED": "plain-expanded", "FROM_SECRET": "s3cret", "FROM_CM": "hi",
        "POD_NAME": "inspect", "POD_NAMESPACE": ns, "CM_greeting": "hi", "S_token": "tkn",
        "DATA_DIR": str(node_agent.pvc_path("data", ns) / "out"),
    }
    assert report["secret"] == "s3cret"
    assert report["config"] == "answer: 42\n"
    assert report["scratch"] == "scratch"
    assert report["rbac"] == 403  # the pod acts as its ServiceAccount, which RBAC gives nothing
    assert (node_agent.pvc_path("data", ns) / "out" / "result.txt").read_text() == "written by the pod"


def test_restart_on_failure_init_containers_and_previous_log(kube_cluster, node_agent, kube_namespace):
    """restartPolicy OnFailure restarts the container in place (after kubelet's 10s back-off)."""
    needs_local_agent(node_agent)
    ns = kube_namespace
    code = textwrap.dedent("""
        import pathlib, sys
        marker = pathlib.Path("/work/tries")
        tries = int(marker.read_text()) + 1 if marker.exists() else 1
        marker.write_text(str(tries))
        print(f"try {tries}; init said {pathlib.Path('/work/init.txt').read_text()}")
        sys.exit(0 if tries >= 2 else 5)
    """)
    kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky"},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [{"name": "prepare", "image": "busybox",
                                "command": ["python", "-c", "open('/work/init.txt', 'w').write('ready')"],
                                "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "containers": [{"name": "main", "image": "busybox", "command": ["python", "-c", code],
                            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    })
    pod = wait_until(lambda: (p := kube_cluster.rest.get(f"/api/v1/namespaces/{ns}/pods/flaky"))["status"].get(
        "phase") in ("Succeeded", "Failed") and p, timeout=60, what="the pod to finish")
    assert pod["status"]["phase"] == "Succeeded"
    [main] = pod["status"]["containerStatuses"]
    assert main["restartCount"] == 1
    assert main["lastState"]["terminated"]["exitCode"] == 5
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert kube_cluster.pod_log(ns, "flaky", "main").strip() == "try 2; init said ready"
    assert kube_cluster.pod_log(ns, "flaky", "main", previous=True).strip() == "try 1; init said ready"


def test_pod_waits_for_a_missing_secret(kube_cluster, node_agent, kube_namespace):
    needs_local_agent(node_agent)
    ns = kube_namespace
    kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "patient"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "busybox", "command": ["python", "-c", "import os; print(os.environ['KEY'])"],
            "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "later", "key": "key"}}}]}]},
    })

    def waiting_reason():
        statuses = kube_cluster.rest.get(f"/api/v1/namespaces/{ns}/pods/patient")["status"].get("containerStatuses")
        return statuses and statuses[0]["state"].get("waiting", {}).get("reason")

    assert wait_until(waiting_reason, timeout=30, what="a waiting reason") == "CreateContainerConfigError"
    kube_cluster.rest.post(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "later"}, "stringData": {"key": "finally"}})
    wait_until(lambda: kube_cluster.rest.get(f"/api/v1/namespaces/{ns}/pods/patient")["status"]["phase"]
               == "Succeeded", timeout=30, what="the pod to run once the Secret exists")
    assert kube_cluster.pod_log(ns, "patient").strip() == "finally"


def test_deployment_becomes_available_and_its_deletion_stops_the_process(kube_cluster, node_agent, kube_namespace):
    needs_local_agent(node_agent)
    ns = kube_namespace
    kube_cluster.rest.post(f"/apis/apps/v1/namespaces/{ns}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "server"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "server"}},
            "template": {"metadata": {"labels": {"app": "server"}}, "spec": {"containers": [{
                "name": "main", "image": "busybox",
                "command": ["python", "-c", "import time; print('serving', flush=True); time.sleep(600)"]}]}},
        },
    })
    kube_cluster.kubectl("rollout", "status", "deployment/server", "-n", ns, "--timeout=60s")
    [pod] = kube_cluster.rest.get(f"/api/v1/namespaces/{ns}/pods", params={"labelSelector": "app=server"})["items"]
    pid = wait_until(lambda: node_agent.pod_pids(ns, pod["metadata"]["name"]).get("main"), what="the pid")
    assert _alive(pid)
    kube_cluster.kubectl("delete", "deployment", "server", "-n", ns, "--wait=true")
    wait_until(lambda: not _alive(pid), timeout=30, what="the process of the deleted Deployment's pod to end")
    wait_until(lambda: not kube_cluster.rest.get(f"/api/v1/namespaces/{ns}/pods",
                                                 params={"labelSelector": "app=server"})["items"],
               timeout=30, what="the pod to be removed")


def test_node_is_registered_and_ready(kube_cluster, node_agent):
    nodes = kube_cluster.rest.get("/api/v1/nodes")["items"]
    assert nodes
    for node in nodes:
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


# --------------------------------------------------------------------------------------------------
# kubectl and helm with the generated kubeconfig


def test_kubectl_apply_and_get(kube_cluster, kube_namespace):
    manifest = yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": "applied", "namespace": kube_namespace},
                               "data": {"colour": "blue"}})
    out = kube_cluster.kubectl("apply", "-f", "-", input=manifest).stdout
    assert "configmap/applied created" in out
    got = kube_cluster.kubectl("get", "configmap", "applied", "-n", kube_namespace, "-o", "json").stdout
    assert json.loads(got)["data"] == {"colour": "blue"}
    # server-side apply and a second apply that changes nothing
    assert "serverside-applied" in kube_cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest).stdout
    version = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    if not kube_cluster.existing:
        assert version["serverVersion"]["gitVersion"] == K8S_VERSION
        assert version["clientVersion"]["gitVersion"] == K8S_VERSION
    nodes = kube_cluster.kubectl("get", "nodes", "-o", "name").stdout
    assert nodes is not None


def test_helm_install_and_uninstall(kube_cluster, node_agent, kube_namespace):
    release = "smoke"
    kube_cluster.helm("install", release, str(CHART), "--namespace", kube_namespace, "--set",
                      "message=hello from the test", "--wait", "--wait-for-jobs", "--timeout", "2m")
    status = json.loads(kube_cluster.helm("status", release, "-n", kube_namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    configmap = kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/configmaps/{release}-settings")
    assert configmap["data"]["message"] == "hello from the test"
    job = kube_cluster.rest.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/{release}-hello")
    assert job_condition(job, "Complete")
    [pod] = kube_cluster.job_pods(kube_namespace, f"{release}-hello")
    assert "hello from the test" in kube_cluster.pod_log(kube_namespace, pod["metadata"]["name"])

    kube_cluster.helm("uninstall", release, "-n", kube_namespace, "--wait")
    assert kube_cluster.rest.get(f"/api/v1/namespaces/{kube_namespace}/configmaps/{release}-settings",
                                 ok_missing=True) is None
    wait_until(lambda: kube_cluster.rest.get(f"/apis/batch/v1/namespaces/{kube_namespace}/jobs/{release}-hello",
                                             ok_missing=True) is None, timeout=30, what="the Job to be removed")
    releases = json.loads(kube_cluster.helm("list", "-n", kube_namespace, "-o", "json").stdout)
    assert releases == []


def test_control_plane_started_quickly(kube_cluster):
    if kube_cluster.existing:
        pytest.skip("no local control plane")
    timings = kube_cluster.control_plane.timings
    print(f"control plane start: {timings}")  # shown with -s or -rA
    assert timings["total"] < 30, timings
