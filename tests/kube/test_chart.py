"""The Helm chart (charts/isdr), its CRDs and its RBAC.

The first half renders the chart with the pinned `helm` (no cluster needed): lint, both storage
types, a CA bundle, the operator's environment contract, security contexts, RBAC rules evaluated
like the API server would, crds/ being the repository's crds/ through symlinks, skaffold.yaml.

The second half (marked `kube`) installs the chart into a real API server: the CRDs are served,
the objects exist, RBAC is least privilege as the API server's authorizer sees it (subject access
reviews and requests with the ServiceAccounts' own tokens), the DicomSeries schema and its CEL
rules reject bad objects, kopf runs with only the operator's Role, and `helm uninstall` cleans up.
No node agent: the Deployments' pods stay Pending, which is all these tests need.

The session's control plane has the CRDs pre-installed (as an administrator applies them with
kubectl), so these installs pass crds.enabled=false (SHARED_CRDS); the chart's own management of
the CRDs is tested on a control plane of its own in tests/kube/test_chart_crds.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from functools import cache
from itertools import pairwise
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml

from tests.support.kube import KubeError, kubeconfig_cluster, tool_path, wait_until, write_kubeconfig
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "isdr"
CRDS = REPO / "crds"
RELEASE = "isdr"
# The session's control plane shares its pre-installed CRDs with every test: leave them alone.
SHARED_CRDS = ("--set", "crds.enabled=false")
ISDR_CRD_FILES = ("fingerprint.yaml", "dicomseries.yaml")

S3_VALUES = ("storage.type=s3", "storage.s3.bucket=isdr-bucket", "storage.s3.endpoint=http://minio:9000",
             "storage.s3.prefix=incoming", "storage.s3.credentials.existingSecret=isdr-s3")

# The operator's environment: the lead's operator code reads exactly these names.
OPERATOR_ENV_ALWAYS = {
    "POD_NAME", "POD_NAMESPACE", "POD_ID",
    "JOB_IMAGE", "JOB_IMAGE_PULL_POLICY", "JOB_SERVICE_ACCOUNT", "JOB_TTL_SECONDS_AFTER_FINISHED",
    "JOB_BACKOFF_LIMIT", "JOB_CPU_REQUEST", "JOB_MEMORY_REQUEST", "JOB_MEMORY_LIMIT", "JOB_ENV_CONFIGMAP",
    "JOB_POD_SECURITY_CONTEXT", "JOB_SECURITY_CONTEXT",
}


# --------------------------------------------------------------------------------------------------
# helpers


def helm_binary() -> str:
    path = tool_path("helm")
    if path is None:
        from tests.support.processes import missing

        missing("helm (build it with hack/k8s/ensure-binaries.sh)")
    return path


def helm_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{name}_HOME"] = str(home / name.lower())
    return env


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"isdr-helm-home-{os.getuid()}"
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=helm_env(home),
                            timeout=120, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@cache
def _render(sets: tuple[str, ...], values_files: tuple[str, ...], namespace: str, include_crds: bool) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for item in sets:
        args += ["--set", item]
    for file in values_files:
        args += ["--values", file]
    if include_crds:
        args.append("--include-crds")
    return run_helm(*args).stdout


def render(*sets: str, values_files: tuple[str, ...] = (), namespace: str = "isdr-ns",
           include_crds: bool = False) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render(tuple(sets), tuple(values_files), namespace, include_crds)) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def rbac_allows(docs: list[dict], namespace: str, service_account: str, group: str, resource: str,
                verb: str) -> bool:
    """The RBAC authorizer's answer for a ServiceAccount, from the rendered Roles and bindings."""
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = binding.get("subjects") or []
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account
                   and s.get("namespace", namespace) == namespace for s in subjects):
            continue
        ref = binding["roleRef"]
        role = one(docs, ref["kind"], ref["name"])
        for rule in role.get("rules", []):
            if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
               (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) and \
               (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
                return True
    return False


# (group, resource, verb) -> allowed?, per component. The one table both the rendered rules and
# the live API server are checked against.
RECEIVER_ACCESS = {
    ("isdr.io", "dicomseries", "create"): True,
    ("isdr.io", "dicomseries", "get"): True,
    ("isdr.io", "dicomseries", "list"): True,
    ("isdr.io", "dicomseries", "watch"): True,
    ("isdr.io", "dicomseries", "patch"): True,
    ("isdr.io", "dicomseries", "update"): True,
    ("isdr.io", "dicomseries/status", "patch"): True,
    ("", "events", "create"): True,
    ("isdr.io", "dicomseries", "delete"): False,
    ("isdr.io", "dicomseries", "deletecollection"): False,
    ("isdr.io", "fingerprints", "get"): False,
    ("isdr.io", "fingerprints", "patch"): False,
    ("batch", "jobs", "create"): False,
    ("", "pods", "list"): False,
    ("", "secrets", "get"): False,
    ("", "configmaps", "get"): False,
    ("kopf.dev", "kopfpeerings", "patch"): False,
}
OPERATOR_ACCESS = {
    ("isdr.io", "fingerprints", "get"): True,
    ("isdr.io", "fingerprints", "list"): True,
    ("isdr.io", "fingerprints", "watch"): True,
    ("isdr.io", "fingerprints", "patch"): True,
    ("isdr.io", "fingerprints/status", "patch"): True,
    ("isdr.io", "fingerprints/status", "update"): True,
    ("isdr.io", "dicomseries", "watch"): True,
    ("isdr.io", "dicomseries", "patch"): True,
    ("isdr.io", "dicomseries", "delete"): True,
    ("isdr.io", "dicomseries/status", "patch"): True,
    ("batch", "jobs", "create"): True,
    ("batch", "jobs", "delete"): True,
    ("batch", "jobs", "watch"): True,
    ("", "pods", "watch"): True,
    ("", "pods", "get"): True,
    ("", "events", "create"): True,
    ("", "configmaps", "get"): True,
    ("", "secrets", "get"): True,
    ("kopf.dev", "kopfpeerings", "patch"): True,
    ("kopf.dev", "kopfpeerings", "watch"): True,
    ("isdr.io", "fingerprints", "create"): False,
    ("isdr.io", "fingerprints", "delete"): False,
    ("isdr.io", "dicomseries", "create"): False,
    ("batch", "jobs", "patch"): False,
    ("", "pods", "delete"): False,
    ("", "pods", "create"): False,
    ("", "secrets", "list"): False,
    ("", "secrets", "watch"): False,
    ("", "configmaps", "list"): False,
    ("", "configmaps", "create"): False,
    ("rbac.authorization.k8s.io", "roles", "create"): False,
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): False,
    ("", "namespaces", "list"): False,
}
JOB_ACCESS = {
    ("isdr.io", "dicomseries", "get"): False,
    ("isdr.io", "dicomseries/status", "patch"): False,
    ("isdr.io", "fingerprints", "get"): False,
    ("batch", "jobs", "get"): False,
    ("", "pods", "get"): False,
    ("", "events", "create"): False,
    ("", "secrets", "get"): False,
    ("", "configmaps", "get"): False,
}


# --------------------------------------------------------------------------------------------------
# the chart, rendered


def test_helm_lint_passes_strict():
    for extra in ((), ("--set", ",".join(S3_VALUES)),
                  ("--set", "inferenceServer.caBundle.secret=ca,inferenceServer.caBundle.key=bundle.pem")):
        result = run_helm("lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in result.stdout, result.stdout


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "isdr" and chart["appVersion"] == "0.1.0"
    project = (REPO / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in project


def test_default_render_has_every_component_and_no_cluster_scoped_rbac():
    docs = render()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted([
        ("CustomResourceDefinition", "dicomseries.isdr.io"),
        ("CustomResourceDefinition", "fingerprints.isdr.io"),
        ("ConfigMap", "isdr-config"),
        ("Deployment", "isdr-operator"),
        ("Deployment", "isdr-receiver"),
        ("KopfPeering", "isdr"),
        ("PersistentVolumeClaim", "isdr-data"),
        ("PodDisruptionBudget", "isdr-receiver"),
        ("Pod", "isdr-test-echo"),
        ("Role", "isdr-operator"),
        ("Role", "isdr-receiver"),
        ("RoleBinding", "isdr-operator"),
        ("RoleBinding", "isdr-receiver"),
        ("Service", "isdr-receiver"),
        ("Service", "isdr-receiver-metrics"),
        ("Service", "isdr-operator-metrics"),
        ("ServiceAccount", "isdr-job"),
        ("ServiceAccount", "isdr-operator"),
        ("ServiceAccount", "isdr-receiver"),
    ])
    for doc in docs:
        assert doc["kind"] not in ("ClusterRole", "ClusterRoleBinding")
        if doc["kind"] != "CustomResourceDefinition":  # cluster-scoped
            assert doc["metadata"]["namespace"] == "isdr-ns"
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                    "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert labels.get(key), f"{doc['kind']}/{doc['metadata']['name']} lacks the label {key}"
        assert labels["app.kubernetes.io/part-of"] == "isdr"


def test_release_name_prefixes_every_object():
    docs = [d for d in yaml.safe_load_all(run_helm("template", "clinic-a", str(CHART)).stdout) if d]
    names = {d["metadata"]["name"] for d in docs if d["kind"] != "CustomResourceDefinition"}
    assert all(n.startswith("clinic-a-isdr") for n in names), names
    peering = one(docs, "KopfPeering")["metadata"]["name"]
    assert f"--peering={peering}" in container(one(docs, "Deployment", "clinic-a-isdr-operator"))["args"]


@pytest.mark.parametrize("component,access", [("receiver", RECEIVER_ACCESS), ("operator", OPERATOR_ACCESS),
                                              ("job", JOB_ACCESS)])
def test_rendered_rbac_is_least_privilege(component, access):
    docs = render()
    sa = f"isdr-{component}"
    for (group, resource, verb), allowed in access.items():
        assert rbac_allows(docs, "isdr-ns", sa, group, resource, verb) is allowed, \
            f"{sa} {verb} {resource}.{group or 'core'}: expected {'allowed' if allowed else 'denied'}"
    for role in (d for d in docs if d["kind"] == "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]


def test_the_job_service_account_is_bound_to_nothing_and_has_no_token():
    docs = render()
    sa = one(docs, "ServiceAccount", "isdr-job")
    assert sa["automountServiceAccountToken"] is False
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        assert all(s["name"] != "isdr-job" for s in binding["subjects"])


def test_receiver_deployment_and_service():
    docs = render()
    deployment = one(docs, "Deployment", "isdr-receiver")
    c = container(deployment)
    assert c["args"] == ["scp"] and "command" not in c
    assert c["ports"] == [{"name": "dicom", "containerPort": 11112, "protocol": "TCP"},
                          {"name": "health", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9120, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "dicom"}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "isdr-receiver"
    assert {"POD_NAME", "POD_NAMESPACE", "HEALTH_PORT"} <= set(env_of(c))
    assert env_of(c)["HEALTH_PORT"]["value"] == "8080"
    assert c["envFrom"] == [{"configMapRef": {"name": "isdr-config"}}]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"tmp": "/tmp", "data": "/data"}
    service = one(docs, "Service", "isdr-receiver")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "dicom", "port": 11112, "targetPort": "dicom", "protocol": "TCP"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "receiver"


def test_receiver_service_can_be_a_node_port_or_load_balancer():
    docs = render("receiver.service.type=NodePort", "receiver.service.nodePort=30104")
    spec = one(docs, "Service", "isdr-receiver")["spec"]
    assert spec["type"] == "NodePort" and spec["ports"][0]["nodePort"] == 30104
    docs = render("receiver.service.type=LoadBalancer", "receiver.service.externalTrafficPolicy=Local",
                  "receiver.service.loadBalancerSourceRanges={10.0.0.0/8}")
    spec = one(docs, "Service", "isdr-receiver")["spec"]
    assert spec["type"] == "LoadBalancer" and spec["externalTrafficPolicy"] == "Local"
    assert spec["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert "nodePort" not in spec["ports"][0]


def test_operator_deployment_environment_contract_for_pvc_storage():
    docs = render()
    deployment = one(docs, "Deployment", "isdr-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(deployment)
    assert c["args"] == ["operator", "--namespace=$(POD_NAMESPACE)", "--peering=isdr",
                         "--liveness=http://0.0.0.0:8080/healthz"]
    assert c["ports"] == [{"name": "health", "containerPort": 8080},
                          {"name": "metrics", "containerPort": 9120, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = env_of(c)
    assert set(env) == OPERATOR_ENV_ALWAYS | {"STORAGE_PVC_CLAIM"}
    values = {name: e.get("value") for name, e in env.items()}
    assert values["JOB_IMAGE"] == c["image"] == "isdr:0.1.0"
    assert values["JOB_SERVICE_ACCOUNT"] == "isdr-job"
    assert values["JOB_TTL_SECONDS_AFTER_FINISHED"] == "86400"
    assert values["JOB_BACKOFF_LIMIT"] == "3"
    assert values["JOB_CPU_REQUEST"] == "100m"
    assert values["JOB_MEMORY_REQUEST"] == "256Mi"
    assert values["JOB_MEMORY_LIMIT"] == "2Gi"
    assert values["JOB_ENV_CONFIGMAP"] == "isdr-config"
    assert values["STORAGE_PVC_CLAIM"] == "isdr-data"
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    for name in ("JOB_TTL_SECONDS_AFTER_FINISHED", "JOB_BACKOFF_LIMIT"):
        int(values[name])
    config = one(docs, "ConfigMap")["data"]
    assert config["STORAGE"] == "local" and config["INCOMING_DIR"] == "/data" and config["SCP_PORT"] == "11112"
    assert all(isinstance(v, str) for v in config.values())


def test_settings_in_the_config_map_are_accepted_by_the_relay(tmp_path):
    from relay.config import ENV_VARIABLES, load_settings

    for sets in ((), S3_VALUES):
        data = one(render(*sets), "ConfigMap")["data"]
        assert set(data) <= set(ENV_VARIABLES), set(data) - set(ENV_VARIABLES)
        settings = load_settings(data)
        assert settings.scp_port == 11112


def test_s3_storage():
    docs = render(*S3_VALUES)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    config = one(docs, "ConfigMap")["data"]
    assert config["STORAGE"] == "s3"
    assert config["S3_BUCKET"] == "isdr-bucket"
    assert config["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert config["S3_PREFIX"] == "incoming"
    for name in ("isdr-receiver", "isdr-operator"):
        c = container(one(docs, "Deployment", name))
        assert {"secretRef": {"name": "isdr-s3"}} in c["envFrom"]
        assert "/data" not in {m["mountPath"] for m in c["volumeMounts"]}
        assert not any("AWS_" in name for name in env_of(c)), "credentials come from the Secret only"
    env = env_of(container(one(docs, "Deployment", "isdr-operator")))
    assert set(env) == OPERATOR_ENV_ALWAYS | {"S3_CREDENTIALS_SECRET"}
    assert env["S3_CREDENTIALS_SECRET"]["value"] == "isdr-s3"
    # without a Secret (IRSA, workload identity): no envFrom secret, no S3_CREDENTIALS_SECRET
    docs = render("storage.type=s3", "storage.s3.bucket=isdr-bucket")
    env = env_of(container(one(docs, "Deployment", "isdr-operator")))
    assert set(env) == OPERATOR_ENV_ALWAYS


def test_existing_claim_is_used_and_no_claim_is_created():
    docs = render("storage.pvc.existingClaim=shared-nfs")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for name in ("isdr-receiver", "isdr-operator"):
        volumes = one(docs, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared-nfs"}} in volumes
    env = env_of(container(one(docs, "Deployment", "isdr-operator")))
    assert env["STORAGE_PVC_CLAIM"]["value"] == "shared-nfs"


def test_created_claim_is_read_write_many_and_kept():
    claim = one(render("storage.pvc.size=10Gi", "storage.pvc.storageClassName=nfs"), "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    claim = one(render("storage.pvc.keep=false"), "PersistentVolumeClaim")
    assert "helm.sh/resource-policy" not in (claim["metadata"].get("annotations") or {})


@pytest.mark.parametrize("source", ["configMap", "secret"])
def test_ca_bundle_is_mounted_and_cert_file_set(source):
    docs = render(f"inferenceServer.caBundle.{source}=hospital-ca", "inferenceServer.caBundle.key=bundle.pem")
    config = one(docs, "ConfigMap")["data"]
    assert config["CERT_FILE"] == "/etc/isdr/ca/bundle.pem"
    for name in ("isdr-receiver", "isdr-operator"):
        spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "ca-bundle"]
        if source == "configMap":
            assert volume["configMap"] == {"name": "hospital-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}
        else:
            assert volume["secret"] == {"secretName": "hospital-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}
        mounts = {m["name"]: m for m in container({"spec": {"template": {"spec": spec}}})["volumeMounts"]}
        assert mounts["ca-bundle"]["mountPath"] == "/etc/isdr/ca" and mounts["ca-bundle"]["readOnly"] is True
    env = env_of(container(one(docs, "Deployment", "isdr-operator")))
    key = "CA_BUNDLE_CONFIGMAP" if source == "configMap" else "CA_BUNDLE_SECRET"
    assert set(env) == OPERATOR_ENV_ALWAYS | {"STORAGE_PVC_CLAIM", key, "CA_BUNDLE_KEY"}
    assert env[key]["value"] == "hospital-ca" and env["CA_BUNDLE_KEY"]["value"] == "bundle.pem"
    assert "CERT_FILE" not in one(render(), "ConfigMap")["data"]


def test_pods_are_locked_down():
    for sets in ((), S3_VALUES):
        docs = render(*sets)
        for deployment in (d for d in docs if d["kind"] == "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "runAsUser" not in spec["securityContext"], "the image's user, or the platform's"
            c = container(deployment)
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert any(v["name"] == "tmp" and "emptyDir" in v for v in spec["volumes"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]


def test_placement_and_image_values_pass_through():
    docs = render("receiver.nodeSelector.zone=dmz", "operator.tolerations[0].key=dedicated",
                  "operator.tolerations[0].operator=Exists", "image.repository=registry.example.org/isdr",
                  "image.tag=1.2.3", "image.digest=sha256:" + "a" * 64, "imagePullSecrets[0].name=regcred")
    receiver = one(docs, "Deployment", "isdr-receiver")["spec"]["template"]["spec"]
    operator = one(docs, "Deployment", "isdr-operator")["spec"]["template"]["spec"]
    assert receiver["nodeSelector"] == {"zone": "dmz"}
    assert operator["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    image = "registry.example.org/isdr:1.2.3@sha256:" + "a" * 64
    assert container({"spec": {"template": {"spec": receiver}}})["image"] == image
    assert env_of(container({"spec": {"template": {"spec": operator}}}))["JOB_IMAGE"]["value"] == image
    assert receiver["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(docs, "ServiceAccount", "isdr-job")["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("sets,message", [
    (("storage.type=s3",), "bucket"),
    (("storage.type=nfs",), "storage/type"),
    (("config.CERT_FILE=/x",), "config.CERT_FILE is set by the chart"),
    (("config.STORAGE=s3",), "config.STORAGE is set by the chart"),
    (("inferenceServer.caBundle.configMap=a", "inferenceServer.caBundle.secret=b"), "not both"),
    (("typo=1",), "typo"),
    (("receiver.service.type=ExternalName",), "receiver/service/type"),
    (("config.HEALTH_PORT=1",), "config.HEALTH_PORT is set by the chart"),
    (("receiver.healthPort=11112",), "the receiver's ports must differ"),
    (("receiver.healthPort=9120",), "the receiver's ports must differ"),
    (("receiver.tls.enabled=true", "receiver.tls.secretName=tls", "receiver.tls.port=8080"),
     "the receiver's ports must differ"),
    (("crds.enabled=yes",), "crds/enabled"),
])
def test_invalid_values_are_refused(sets, message):
    args = ["template", RELEASE, str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_values_yaml_is_valid_against_its_schema_and_commented():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    lines = (CHART / "values.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            assert lines[number - 1].startswith("#"), f"values.yaml: top-level key {line!r} has no comment"
    for name in ("values-pvc.yaml", "values-s3.yaml"):
        example = yaml.safe_load((CHART / "examples" / name).read_text())
        jsonschema.validate(example, schema)
        assert render(values_files=(str(CHART / "examples" / name),))


def test_the_chart_reads_the_repository_crds_through_links():
    links = {p.relative_to(CHART).as_posix(): p for p in (CHART / "crds").iterdir()}
    links.update({p.relative_to(CHART).as_posix(): p for p in (CHART / "files" / "crds").iterdir()})
    assert sorted(links) == ["crds/kopfpeering.yaml", "files/crds/dicomseries.yaml", "files/crds/fingerprint.yaml"]
    assert sorted(p.name for p in links.values()) == sorted(p.name for p in CRDS.glob("*.yaml"))
    for relative, path in links.items():
        assert path.is_symlink(), f"charts/isdr/{relative} must link to crds/{path.name}, not copy it"
        assert path.resolve() == (CRDS / path.name).resolve()
    # kopf's CRD is Helm's crds/ folder (installed once, owned by nobody): `helm show crds`, --include-crds
    shown = run_helm("show", "crds", str(CHART)).stdout
    assert shown.strip() == (CRDS / "kopfpeering.yaml").read_text().strip()
    included = [d for d in render(include_crds=True) if d["kind"] == "CustomResourceDefinition"]
    assert {d["metadata"]["name"] for d in included} == {"kopfpeerings.kopf.dev", *(
        yaml.safe_load((CRDS / f).read_text())["metadata"]["name"] for f in ISDR_CRD_FILES)}


def test_isdr_crds_are_templates_of_the_repository_files_kept_on_uninstall():
    rendered = {d["metadata"]["name"]: d for d in render() if d["kind"] == "CustomResourceDefinition"}
    for name in ISDR_CRD_FILES:
        source = yaml.safe_load((CRDS / name).read_text())
        crd = rendered[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"], f"{name}: the template must render the file as it is"
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "isdr"
        assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "crds"
    not_kept = [d for d in render("crds.keep=false") if d["kind"] == "CustomResourceDefinition"]
    assert len(not_kept) == 2 and not any((d["metadata"].get("annotations") or {}) for d in not_kept)
    assert not [d for d in render("crds.enabled=false") if d["kind"] == "CustomResourceDefinition"]


def test_packaged_chart_contains_the_crd_contents(tmp_path):
    run_helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("isdr-*.tgz")
    import tarfile

    with tarfile.open(archive) as tar:
        for member_name, source in (("isdr/crds/kopfpeering.yaml", "kopfpeering.yaml"),
                                    *((f"isdr/files/crds/{n}", n) for n in ISDR_CRD_FILES)):
            member = tar.getmember(member_name)
            assert member.isfile(), "a packaged chart must hold the file, not a link"
            assert tar.extractfile(member).read() == (CRDS / source).read_bytes()
        assert tar.getmember("isdr/examples/fingerprint-ct-thorax-oars.yaml").isfile()
    # and the packaged chart renders the same CRDs as the folder
    packaged = {d["metadata"]["name"]: d for d in yaml.safe_load_all(run_helm("template", RELEASE, str(archive)).stdout)
                if d and d["kind"] == "CustomResourceDefinition"}
    assert packaged == {d["metadata"]["name"]: d for d in render() if d["kind"] == "CustomResourceDefinition"}


def test_example_fingerprint_is_the_repository_example():
    path = CHART / "examples" / "fingerprint-ct-thorax-oars.yaml"
    assert path.resolve() == (REPO / "examples" / "fingerprints" / "ct-thorax-oars.yaml").resolve()
    assert yaml.safe_load(path.read_text())["kind"] == "Fingerprint"


def test_dicomseries_crd_shape():
    crd = yaml.safe_load((CRDS / "dicomseries.yaml").read_text())
    assert crd["metadata"]["name"] == "dicomseries.isdr.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("DicomSeries", "dicomseries", "dicomseries")
    assert names["shortNames"] == ["dcms"] and names["categories"] == ["isdr"]
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["tasks"]["x-kubernetes-list-map-keys"] == ["taskId"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Description", "Modality", "Instances", "Phase", "Tasks", "Age"]

    def walk(node, path):
        if path and path[-1] not in ("metadata",) and "description" not in node:
            raise AssertionError(f"{'.'.join(path)} has no description")
        for name, child in (node.get("properties") or {}).items():
            walk(child, path + [name])
        if "items" in node:
            walk(node["items"], path + ["items"])

    walk(schema, ["DicomSeries"])
    # no patient data fields, anywhere
    text = (CRDS / "dicomseries.yaml").read_text()
    for forbidden in ("patientName", "patientID", "patientId", "birthDate", "PatientName"):
        assert forbidden not in text


def test_dicomseries_phases_match_the_life_cycle_rules():
    from relay import lifecycle

    crd = yaml.safe_load((CRDS / "dicomseries.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status["phase"]["enum"]) == {str(phase) for phase in lifecycle.SeriesPhase}
    task_phases = set(status["tasks"]["items"]["properties"]["phase"]["enum"])
    assert task_phases == {str(phase) for phase in lifecycle.TaskPhase}


def test_kopfpeering_crd_is_what_kopf_looks_for():
    crd = yaml.safe_load((CRDS / "kopfpeering.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    assert (crd["spec"]["group"], version["name"], crd["spec"]["names"]["plural"]) == ("kopf.dev", "v1", "kopfpeerings")
    try:  # kopf's own selector of the namespaced peering resource (a private module: may move)
        from kopf._cogs.structs.references import NAMESPACED_PEERINGS_K as selector
    except ImportError:
        selector = None
    if selector is not None:
        assert (selector.group, selector.version, selector.any_name) == ("kopf.dev", "v1", "kopfpeerings")
    assert crd["spec"]["scope"] == "Namespaced"
    assert "subresources" not in version, "kopf patches the peering's status through the main resource"
    assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]


def test_skaffold_deploys_the_chart_with_the_built_image():
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4beta") and config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    assert (REPO / artifact["docker"]["dockerfile"]).is_file()
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"]).resolve() == CHART.resolve()
    templates = release["setValueTemplates"]
    suffix = artifact["image"].replace("-", "_").replace("/", "_")
    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{suffix}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{suffix}}}}}"
    # what skaffold would run: helm with those values, substituted
    sets = [f"{k}={v}" for k, v in release.get("setValues", {}).items()]
    sets += ["image.repository=registry.local/isdr", "image.tag=abc123"]
    for profile in config.get("profiles", []):
        for patch in profile.get("patches", []):
            key = patch["path"].rsplit("/", 1)[-1]
            sets.append(f"{key}={patch['value']}")
    docs = render(*sets)
    assert container(one(docs, "Deployment", "isdr-receiver"))["image"] == "registry.local/isdr:abc123"
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


# --------------------------------------------------------------------------------------------------
# the chart, installed into a real API server


def subject_access(cluster, namespace: str, service_account: str, group: str, resource: str, verb: str) -> bool:
    resource, _, subresource = resource.partition("/")
    review = cluster.rest.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{namespace}:{service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "resourceAttributes": {"namespace": namespace, "group": group, "resource": resource,
                                   "subresource": subresource, "verb": verb},
        },
    })
    return bool(review["status"].get("allowed"))


def token_for(cluster, namespace: str, service_account: str) -> str:
    return cluster.kubectl("-n", namespace, "create", "token", service_account, "--duration=10m").stdout.strip()


class AsServiceAccount:
    """Plain REST calls with a ServiceAccount's own bearer token (authentication included)."""

    def __init__(self, cluster, token: str):
        self.cluster = cluster
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.verify = cluster.rest.verify

    def call(self, method: str, path: str, body=None, content_type="application/json") -> requests.Response:
        # verify per request: REQUESTS_CA_BUNDLE would override a session's setting
        return self.session.request(method, self.cluster.server + path, data=None if body is None else json.dumps(body),
                                    headers={"Content-Type": content_type}, timeout=30, verify=self.verify)


def series(name: str = "series-00112233445566778899", uid: str = "1.2.826.0.1.3680043.8.498.1",
           **spec) -> dict:
    return {
        "apiVersion": "isdr.io/v1alpha1",
        "kind": "DicomSeries",
        "metadata": {"name": name},
        "spec": {
            "seriesInstanceUID": uid,
            "sopClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "studyInstanceUID": "1.2.826.0.1.3680043.8.498.2",
            "modality": "CT",
            "seriesDescription": "Thorax 1.0 B31f",
            "studyDescription": "CT Thorax",
            "storage": {"type": "local", "prefix": f"series/{uid}/1.2.840.10008.5.1.4.1.1.2/"},
            **spec,
        },
    }


INSTALL_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def release_namespace(kube_cluster):
    """The chart installed with `helm install` (CRDs included) into a fresh namespace."""
    namespace = kube_cluster.create_namespace("chart")
    INSTALL_OUTPUT[namespace] = kube_cluster.helm("install", RELEASE, str(CHART), "--namespace", namespace,
                                                  *SHARED_CRDS, timeout=180).stdout
    try:
        yield namespace
    finally:
        kube_cluster.helm("uninstall", RELEASE, "--namespace", namespace, check=False)
        kube_cluster.delete_namespace(namespace)


@pytest.mark.kube
def test_helm_install_creates_the_crds_from_the_symlinked_folder(kube_cluster):
    """On a cluster without the kopfpeerings CRD, `helm install` creates it from crds/ (a link) before
    the chart's KopfPeering object. The session's own control plane only: the CRD is deleted first."""
    if kube_cluster.existing:
        pytest.skip("deletes a CustomResourceDefinition; only on the tests' own control plane")
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    namespace = kube_cluster.create_namespace("crds")
    try:
        kube_cluster.rest.delete(f"{base}/kopfpeerings.kopf.dev", ok_missing=True)
        wait_until(lambda: kube_cluster.rest.get(f"{base}/kopfpeerings.kopf.dev", ok_missing=True) is None,
                   60, what="the kopfpeerings CRD to be deleted")
        kube_cluster.helm("install", "crd-check", str(CHART), "--namespace", namespace, *SHARED_CRDS, timeout=180)
        kube_cluster.wait_crd_established("kopfpeerings.kopf.dev")
        crd = kube_cluster.rest.get(f"{base}/kopfpeerings.kopf.dev")
        expected = yaml.safe_load((CRDS / "kopfpeering.yaml").read_text())
        assert crd["spec"]["versions"][0]["schema"] == expected["spec"]["versions"][0]["schema"]
        peering = kube_cluster.rest.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/crd-check-isdr")
        assert peering["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        kube_cluster.helm("uninstall", "crd-check", "--namespace", namespace)
        # Helm never deletes CRDs from crds/
        assert kube_cluster.rest.get(f"{base}/kopfpeerings.kopf.dev", ok_missing=True) is not None
    finally:
        kube_cluster.install_crds()
        kube_cluster.delete_namespace(namespace)


@pytest.mark.kube
def test_crds_are_established_and_served(kube_cluster, release_namespace):
    for name in ("fingerprints.isdr.io", "dicomseries.isdr.io", "kopfpeerings.kopf.dev"):
        kube_cluster.wait_crd_established(name)
    resources = kube_cluster.kubectl("api-resources", "--api-group=isdr.io", "-o", "name").stdout.split()
    assert sorted(resources) == ["dicomseries.isdr.io", "fingerprints.isdr.io"]
    wide = kube_cluster.kubectl("api-resources", "--api-group=isdr.io").stdout
    assert "dcms" in wide and "DicomSeries" in wide
    # kubectl get isdr lists both kinds (category)
    kube_cluster.kubectl("-n", release_namespace, "get", "isdr")


@pytest.mark.kube
def test_with_crds_enabled_false_the_release_leaves_preinstalled_crds_alone(kube_cluster, release_namespace):
    """crds.enabled=false against CRDs an administrator applied: the release neither owns nor changes them."""
    for name in ("fingerprints.isdr.io", "dicomseries.isdr.io"):
        meta = kube_cluster.rest.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")["metadata"]
        assert "meta.helm.sh/release-name" not in (meta.get("annotations") or {})
        assert (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != "Helm"
    manifest = kube_cluster.helm("get", "manifest", RELEASE, "-n", release_namespace).stdout
    assert "kind: CustomResourceDefinition" not in manifest


@pytest.mark.kube
def test_release_objects_exist(kube_cluster, release_namespace):
    ns = release_namespace
    for kind, name in (("deployment", "isdr-receiver"), ("deployment", "isdr-operator"),
                       ("service", "isdr-receiver"), ("configmap", "isdr-config"),
                       ("persistentvolumeclaim", "isdr-data"), ("kopfpeering", "isdr"),
                       ("role", "isdr-receiver"), ("role", "isdr-operator"),
                       ("rolebinding", "isdr-receiver"), ("rolebinding", "isdr-operator"),
                       ("serviceaccount", "isdr-receiver"), ("serviceaccount", "isdr-operator"),
                       ("serviceaccount", "isdr-job")):
        kube_cluster.kubectl("-n", ns, "get", kind, name)
    service = kube_cluster.core.read_namespaced_service("isdr-receiver", ns)
    assert service.spec.ports[0].port == 11112 and service.spec.cluster_ip
    notes = INSTALL_OUTPUT[ns]
    assert f"kubectl -n {ns} get fingerprints,dicomseries" in notes
    assert f"kubectl -n {ns} logs job/" in notes


@pytest.mark.kube
@pytest.mark.parametrize("service_type,expected", [
    ("NodePort", "jsonpath='{.spec.ports[0].nodePort}'"),
    ("LoadBalancer", "jsonpath='{.status.loadBalancer.ingress[0]}'"),
])
def test_notes_tell_how_to_reach_the_receiver(kube_cluster, release_namespace, service_type, expected):
    output = kube_cluster.helm("install", "notes", str(CHART), "--namespace", release_namespace, "--dry-run=server",
                               "--set", f"receiver.service.type={service_type}", "--set", ",".join(S3_VALUES),
                               *SHARED_CRDS).stdout
    notes = output[output.index("NOTES:"):]
    assert expected in notes
    assert "s3 bucket isdr-bucket at http://minio:9000" in notes
    assert "you manage ISDR's CRDs. Before every `helm upgrade` to a newer chart, run\n" \
           "kubectl apply --server-side -f crds/" in notes


@pytest.mark.kube
@pytest.mark.parametrize("component,access", [("receiver", RECEIVER_ACCESS), ("operator", OPERATOR_ACCESS),
                                              ("job", JOB_ACCESS)])
def test_api_server_enforces_least_privilege(kube_cluster, release_namespace, component, access):
    answers = {key: subject_access(kube_cluster, release_namespace, f"isdr-{component}", *key) for key in access}
    wrong = {key: answer for key, answer in answers.items() if answer is not access[key]}
    assert not wrong, f"isdr-{component}: unexpected answers (group, resource, verb) -> allowed: {wrong}"
    # nothing outside the release namespace
    for group, resource, verb in access:
        assert not subject_access(kube_cluster, "default", f"isdr-{component}", group, resource, verb)


@pytest.mark.kube
def test_kubectl_auth_can_i_agrees(kube_cluster, release_namespace):
    ns = release_namespace

    def can_i(sa, *args):
        result = kube_cluster.kubectl("auth", "can-i", *args, "-n", ns,
                                      f"--as=system:serviceaccount:{ns}:{sa}", check=False)
        return result.stdout.strip() == "yes"

    assert can_i("isdr-receiver", "create", "dicomseries.isdr.io")
    assert not can_i("isdr-receiver", "delete", "dicomseries.isdr.io")
    assert not can_i("isdr-receiver", "create", "jobs.batch")
    assert can_i("isdr-operator", "create", "jobs.batch")
    assert not can_i("isdr-operator", "list", "secrets")
    assert not can_i("isdr-job", "get", "pods")


@pytest.mark.kube
def test_service_account_tokens_are_really_limited(kube_cluster, release_namespace):
    ns = release_namespace
    base = f"/apis/isdr.io/v1alpha1/namespaces/{ns}/dicomseries"
    receiver = AsServiceAccount(kube_cluster, token_for(kube_cluster, ns, "isdr-receiver"))
    body = series("series-aabbccddeeff0011")
    response = receiver.call("POST", base, body)
    assert response.status_code == 201, response.text
    response = receiver.call("PATCH", f"{base}/series-aabbccddeeff0011/status",
                             {"status": {"instances": 3, "firstReceived": "2026-01-01T10:00:00Z",
                                         "lastReceived": "2026-01-01T10:00:05Z", "receivedBy": ["isdr-receiver-1"],
                                         "phase": "Receiving"}},
                             content_type="application/merge-patch+json")
    assert response.status_code == 200, response.text
    assert receiver.call("DELETE", f"{base}/series-aabbccddeeff0011").status_code == 403
    assert receiver.call("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", {}).status_code == 403
    assert receiver.call("GET", f"/api/v1/namespaces/{ns}/secrets").status_code == 403

    operator = AsServiceAccount(kube_cluster, token_for(kube_cluster, ns, "isdr-operator"))
    assert operator.call("POST", base, series("series-aabbccddeeff0022")).status_code == 403
    assert operator.call("GET", f"/api/v1/namespaces/{ns}/secrets").status_code == 403
    assert operator.call("GET", f"/api/v1/namespaces/{ns}/secrets/absent").status_code == 404
    assert operator.call("DELETE", f"{base}/series-aabbccddeeff0011").status_code == 200

    job = AsServiceAccount(kube_cluster, token_for(kube_cluster, ns, "isdr-job"))
    assert job.call("GET", base).status_code == 403
    assert job.call("GET", f"/api/v1/namespaces/{ns}/pods").status_code == 403


@pytest.mark.kube
def test_dicomseries_schema_and_cel_rules_are_enforced(kube_cluster, release_namespace):
    ns = release_namespace
    base = f"/apis/isdr.io/v1alpha1/namespaces/{ns}/dicomseries"
    rest = kube_cluster.rest

    def rejected(body, method="post", path=base, kind="merge") -> str:
        with pytest.raises(KubeError) as caught:
            if method == "post":
                rest.post(path, body)
            else:
                rest.patch(path, body, kind=kind)
        assert caught.value.status == 422, caught.value
        return str(caught.value)

    assert "seriesInstanceUID" in rejected(series(uid="1.2.3/../4"))
    assert "seriesInstanceUID" in rejected(series(uid="1." + "2" * 70))
    assert "sopClassUID" in rejected(series(sopClassUID="1.2.840.10008.5.1.4.1.1.2 "))
    assert "metadata.name" in rejected(series(name="series-patient-smith"))
    assert "bucket" in rejected(series(storage={"type": "s3", "prefix": "series/1/2/"}))
    assert "prefix" in rejected(series(storage={"type": "local", "prefix": "../etc/"}))
    assert "prefix" in rejected(series(storage={"type": "local", "prefix": "/etc/"}))
    assert "storage.type" in rejected(series(storage={"type": "nfs", "prefix": "series/1/2/"}))

    rest.post(base, series("series-0000000000000001"))
    path = f"{base}/series-0000000000000001"
    assert "immutable" in rejected({"spec": {"seriesInstanceUID": "1.2.3.4"}}, "patch", path)
    assert "immutable" in rejected({"spec": {"sopClassUID": "1.2.840.10008.5.1.4.1.1.4"}}, "patch", path)
    assert "studyInstanceUID" in rejected({"spec": {"studyInstanceUID": "9.9"}}, "patch", path)
    assert "studyInstanceUID" in rejected({"spec": {"studyInstanceUID": None}}, "patch", path)
    # descriptions may change; the UIDs stay
    rest.patch(path, {"spec": {"seriesDescription": "Thorax 2.0"}}, kind="merge")

    # status: tasks keyed by taskId, kopf's own fields kept, enums enforced
    status = {"status": {
        "phase": "Dispatched", "instances": 20, "generation": 1, "dispatchedInstances": 20, "progress": "0/2",
        "tasks": [
            {"taskId": "ct-thorax-oars-0a1b2c3d4e-1", "fingerprint": "ct-thorax-oars", "generation": 1,
             "job": "ct-thorax-oars-0a1b2c3d4e-1", "phase": "Running", "inferenceTaskUID": "4f1c",
             "startTime": "2026-01-01T10:01:00Z"},
            {"taskId": "ct-lungs-5f6a7b8c9d-1", "fingerprint": "ct-lungs", "generation": 1, "phase": "Pending"},
        ],
        "conditions": [{"type": "Complete", "status": "True", "reason": "QuietPeriodElapsed", "message": "",
                        "lastTransitionTime": "2026-01-01T10:00:40Z", "observedGeneration": 1}],
        "kopf": {"progress": {"handler": {"retries": 0}}},
    }}
    rest.patch(f"{path}/status", status, kind="merge")
    stored = rest.get(path)["status"]
    assert stored["kopf"] == {"progress": {"handler": {"retries": 0}}}
    assert [t["taskId"] for t in stored["tasks"]] == ["ct-thorax-oars-0a1b2c3d4e-1", "ct-lungs-5f6a7b8c9d-1"]
    bad_phase = {"status": {"phase": "Complete"}}
    assert "phase" in rejected(bad_phase, "patch", f"{path}/status")
    duplicate = {"status": {"tasks": [status["status"]["tasks"][0], status["status"]["tasks"][0]]}}
    assert "taskId" in rejected(duplicate, "patch", f"{path}/status")

    # what `kubectl get dicomseries` shows
    header, row = kube_cluster.kubectl("-n", ns, "get", "dcms", "series-0000000000000001").stdout.splitlines()[:2]
    columns = ["NAME", "DESCRIPTION", "MODALITY", "INSTANCES", "PHASE", "TASKS", "AGE"]
    assert header.split() == columns
    starts = [header.index(c) for c in columns] + [None]
    cells = dict(zip(columns, (row[a:b].strip() for a, b in pairwise(starts))))
    assert cells["NAME"] == "series-0000000000000001"
    assert cells["DESCRIPTION"] == "Thorax 2.0"
    assert (cells["MODALITY"], cells["INSTANCES"], cells["PHASE"], cells["TASKS"]) == ("CT", "20", "Dispatched", "0/2")
    wide = kube_cluster.kubectl("-n", ns, "get", "dcms", "-o", "wide").stdout
    assert "ct-thorax-oars-0a1b2c3d4e-1" in wide


@pytest.mark.kube
def test_example_fingerprint_is_accepted(kube_cluster, release_namespace):
    example = CHART / "examples" / "fingerprint-ct-thorax-oars.yaml"
    kube_cluster.kubectl("-n", release_namespace, "apply", "-f", str(example))
    output = kube_cluster.kubectl("-n", release_namespace, "get", "fingerprints").stdout
    assert "ct-thorax-oars" in output


KOPF_OPERATOR = textwrap.dedent("""
    # A stand-in for `isdr operator` with the settings the chart's RBAC assumes: one namespace,
    # scanning disabled, peering. It touches every resource the real operator handles.
    import kopf

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.scanning.disabled = True
        settings.peering.priority = 0
        settings.watching.server_timeout = 10

    @kopf.on.resume('isdr.io', 'v1alpha1', 'fingerprints')
    @kopf.on.create('isdr.io', 'v1alpha1', 'fingerprints')
    def fingerprint(body, patch, **_):
        patch.status['observedGeneration'] = body.metadata.get('generation', 0)
        kopf.info(body, reason='Validated', message='accepted by the stand-in operator')

    @kopf.on.resume('isdr.io', 'v1alpha1', 'dicomseries')
    @kopf.on.create('isdr.io', 'v1alpha1', 'dicomseries')
    def series(patch, **_):
        patch.status['phase'] = 'Unmatched'

    @kopf.on.event('batch', 'v1', 'jobs')
    def job(**_):
        pass

    @kopf.on.event('', 'v1', 'pods')
    def pod(**_):
        pass
""")


@pytest.mark.kube
def test_kopf_runs_with_only_the_operator_role(kube_cluster, release_namespace, tmp_path):
    """kopf, with the operator ServiceAccount's token, --namespace and --peering as the chart passes
    them: it joins the peering, handles Fingerprints and DicomSeries, writes Events, and never hits
    a permission error (no ClusterRole needed)."""
    ns = release_namespace
    server, ca_pem = kubeconfig_cluster(kube_cluster.kubeconfig)
    kubeconfig = write_kubeconfig(tmp_path / "operator.kubeconfig", server, ca_pem,
                                  token=token_for(kube_cluster, ns, "isdr-operator"), user="isdr-operator")
    script = tmp_path / "standin_operator.py"
    script.write_text(KOPF_OPERATOR)
    log_path = tmp_path / "kopf.log"
    operator = one(render(namespace=ns), "Deployment", "isdr-operator")
    args = [a.replace("$(POD_NAMESPACE)", ns) for a in container(operator)["args"][1:]]
    # The health endpoint on a free loopback port instead of the pod's 0.0.0.0:8080.
    args = [f"--liveness=http://127.0.0.1:{free_port()}/healthz" if a.startswith("--liveness=") else a
            for a in args]
    kube_cluster.kubectl("-n", ns, "apply", "-f", str(CHART / "examples" / "fingerprint-ct-thorax-oars.yaml"))
    kube_cluster.rest.post(f"/apis/isdr.io/v1alpha1/namespaces/{ns}/dicomseries", series("series-00000000000000aa"))
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), POD_ID="isdr-operator-standin")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "kopf", "run", str(script), "--verbose", *args],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        peering_path = f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/isdr"
        wait_until(lambda: "isdr-operator-standin" in (kube_cluster.rest.get(peering_path).get("status") or {}),
                   60, what="the stand-in operator in the KopfPeering's status")
        fingerprint_path = f"/apis/isdr.io/v1alpha1/namespaces/{ns}/fingerprints/ct-thorax-oars"
        wait_until(lambda: "observedGeneration" in (kube_cluster.rest.get(fingerprint_path).get("status") or {}),
                   60, what="the Fingerprint's status patched by kopf")
        series_path = f"/apis/isdr.io/v1alpha1/namespaces/{ns}/dicomseries/series-00000000000000aa"
        wait_until(lambda: kube_cluster.rest.get(series_path).get("status", {}).get("phase") == "Unmatched",
                   60, what="the DicomSeries' status patched by kopf")
        wait_until(lambda: any(e["reason"] == "Validated" for e in kube_cluster.rest.get(
            f"/api/v1/namespaces/{ns}/events")["items"]), 30, what="kopf's Event")
        time.sleep(2)  # let the watchers of jobs and pods start
        assert process.poll() is None, log_path.read_text()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = log_path.read_text()
    # (Not a bare "403": it turns up in the milliseconds of kopf's timestamps.)
    for symptom in ("Forbidden", "(403)", " 403 ", "Not enough permissions", "APIForbiddenError"):
        assert symptom not in log, f"kopf hit a permission problem:\n{log[-4000:]}"


@pytest.mark.kube
def test_helm_uninstall_removes_the_release_but_keeps_the_data_claim(kube_cluster):
    namespace = kube_cluster.create_namespace("uninstall")
    try:
        kube_cluster.helm("install", "gone", str(CHART), "--namespace", namespace, *SHARED_CRDS)
        assert kube_cluster.apps.list_namespaced_deployment(namespace).items
        result = kube_cluster.helm("uninstall", "gone", "--namespace", namespace)
        assert "PersistentVolumeClaim" in result.stdout + result.stderr  # "kept due to the resource policy"
        assert not kube_cluster.apps.list_namespaced_deployment(namespace).items
        assert not kube_cluster.rest.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles")["items"]
        assert not kube_cluster.rest.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings")["items"]
        claims = kube_cluster.core.list_namespaced_persistent_volume_claim(namespace).items
        assert [c.metadata.name for c in claims] == ["gone-isdr-data"]
        for crd in ("fingerprints.isdr.io", "dicomseries.isdr.io", "kopfpeerings.kopf.dev"):
            kube_cluster.wait_crd_established(crd, timeout=5)
    finally:
        kube_cluster.delete_namespace(namespace)


# --------------------------------------------------------------------------------------------------
# what users of well-kept charts take for granted


def test_job_scheduling_values_reach_the_operator_as_settings_the_operator_reads():
    from isdr_operator.settings import load_operator_settings

    docs = render("job.nodeSelector.pool=inference", "job.tolerations[0].key=gpu",
                  "job.tolerations[0].operator=Exists", "job.priorityClassName=isdr-batch",
                  "job.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
                  "job.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"
                  ".matchExpressions[0].key=zone",
                  "job.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"
                  ".matchExpressions[0].operator=Exists",
                  "job.podLabels.team=radonc")
    docs += render()  # the annotation needs --set-string; values files do it naturally
    env = env_of(container(one(docs[:len(docs) // 2], "Deployment", "isdr-operator")))
    settings = load_operator_settings("ns", {name: e["value"] for name, e in env.items() if "value" in e})
    jobs = settings.jobs
    assert jobs.node_selector == {"pool": "inference"} and jobs.priority_class_name == "isdr-batch"
    assert jobs.tolerations == ({"key": "gpu", "operator": "Exists"},)
    assert jobs.affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 1
    assert jobs.pod_labels == {"team": "radonc"}
    assert jobs.pod_security_context == {"runAsNonRoot": True, "fsGroup": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}}
    assert jobs.security_context["readOnlyRootFilesystem"] is True


def test_job_pod_annotations_from_a_values_file(tmp_path):
    values = tmp_path / "mesh.yaml"
    values.write_text('job:\n  podAnnotations:\n    sidecar.istio.io/inject: "false"\n')
    env = env_of(container(one(render(values_files=(str(values),)), "Deployment", "isdr-operator")))
    assert json.loads(env["JOB_POD_ANNOTATIONS"]["value"]) == {"sidecar.istio.io/inject": "false"}


def test_openshift_gets_no_user_or_group_ids_and_other_clusters_no_user_id():
    plain = render()
    for deployment in (d for d in plain if d["kind"] == "Deployment"):
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert "runAsUser" not in context and context["fsGroup"] == 10001
    openshift = [d for d in yaml.safe_load_all(run_helm("template", RELEASE, str(CHART), "--api-versions",
                                                        "security.openshift.io/v1").stdout) if d]
    for deployment in (d for d in openshift if d["kind"] == "Deployment"):
        context = deployment["spec"]["template"]["spec"]["securityContext"]
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), context
        assert context["runAsNonRoot"] is True
    operator_env = env_of(container(one(openshift, "Deployment", "isdr-operator")))
    assert "fsGroup" not in json.loads(operator_env["JOB_POD_SECURITY_CONTEXT"]["value"])
    forced = render("openshift.adaptSecurityContext=force", "podSecurityContext.runAsUser=5")
    assert "runAsUser" not in one(forced, "Deployment", "isdr-receiver")["spec"]["template"]["spec"]["securityContext"]


def test_receiver_disruption_budget_and_port():
    docs = render("receiver.replicas=3", "receiver.containerPort=2104")
    budget = one(docs, "PodDisruptionBudget")
    receiver = one(docs, "Deployment", "isdr-receiver")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == receiver["spec"]["selector"]["matchLabels"]
    assert container(receiver)["ports"][0]["containerPort"] == 2104
    assert one(docs, "ConfigMap")["data"]["SCP_PORT"] == "2104"
    assert one(render("receiver.podDisruptionBudget.minAvailable=2"), "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2, "selector": budget["spec"]["selector"]}
    assert not [d for d in render("receiver.podDisruptionBudget.enabled=false") if d["kind"] == "PodDisruptionBudget"]


def test_extra_env_and_volumes_go_to_the_receiver_and_the_operator():
    docs = render("extraEnv[0].name=HTTPS_PROXY", "extraEnv[0].value=http://proxy:3128",
                  "extraEnvFrom[0].secretRef.name=proxy-auth",
                  "extraVolumes[0].name=extra-ca", "extraVolumes[0].configMap.name=extra-ca",
                  "extraVolumeMounts[0].name=extra-ca", "extraVolumeMounts[0].mountPath=/etc/extra-ca")
    for name in ("isdr-receiver", "isdr-operator"):
        deployment = one(docs, "Deployment", name)
        c = container(deployment)
        assert env_of(c)["HTTPS_PROXY"]["value"] == "http://proxy:3128"
        assert {"secretRef": {"name": "proxy-auth"}} in c["envFrom"]
        assert {"name": "extra-ca", "mountPath": "/etc/extra-ca"} in c["volumeMounts"]
        assert {"name": "extra-ca", "configMap": {"name": "extra-ca"}} in deployment["spec"]["template"]["spec"]["volumes"]


def test_helm_test_echoes_the_receiver_through_its_service():
    """Rendered here; run live against the chart's pods in tests/kube/test_chart_journey.py."""
    docs = render("config.SCP_ALLOWED_AE_TITLES=CT01\\,PACS", "receiver.service.port=104")
    pod = one(docs, "Pod", "isdr-test-echo")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert container({"spec": {"template": {"spec": pod["spec"]}}})["args"] == [
        "echo", "isdr-receiver.isdr-ns.svc", "104", "ISDR", "--calling-ae=CT01"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not [d for d in render("tests.enabled=false") if d["kind"] == "Pod"]


@pytest.mark.kube
def test_upgrades_between_the_example_values_work_and_keep_the_claim(kube_cluster):
    """Default values -> values-pvc.yaml (a different claim spec: size, class) -> values-s3.yaml ->
    values-pvc.yaml -> a value changed with --reset-then-reuse-values: every `helm upgrade` succeeds
    and the release stays deployed; the claim keeps the spec it was created with."""
    namespace = kube_cluster.create_namespace("upgrade")
    pvc_values, s3_values = (str(CHART / "examples" / n) for n in ("values-pvc.yaml", "values-s3.yaml"))

    def status() -> str:
        return json.loads(kube_cluster.helm("status", "up", "-n", namespace, "-o", "json").stdout)["info"]["status"]

    try:
        kube_cluster.helm("install", "up", str(CHART), "-n", namespace, *SHARED_CRDS)
        claim = kube_cluster.core.read_namespaced_persistent_volume_claim("up-isdr-data", namespace)
        assert claim.spec.resources.requests["storage"] == "50Gi" and not claim.spec.storage_class_name
        upgraded = kube_cluster.helm("upgrade", "up", str(CHART), "-n", namespace, "-f", pvc_values, *SHARED_CRDS)
        assert status() == "deployed"
        assert "keeps its size 50Gi (storage.pvc.size is" in upgraded.stdout
        claim = kube_cluster.core.read_namespaced_persistent_volume_claim("up-isdr-data", namespace)
        assert claim.spec.resources.requests["storage"] == "50Gi" and not claim.spec.storage_class_name
        config = kube_cluster.core.read_namespaced_config_map("up-isdr-config", namespace).data
        assert config["POST_AFTER"] == "30" and config["SCP_ALLOWED_AE_TITLES"] == "CT01,PACS"

        kube_cluster.helm("upgrade", "up", str(CHART), "-n", namespace, "-f", s3_values, *SHARED_CRDS)
        assert status() == "deployed"
        assert kube_cluster.core.read_namespaced_config_map("up-isdr-config", namespace).data["STORAGE"] == "s3"
        # the claim is kept (helm.sh/resource-policy: keep): it may hold acknowledged instances
        kube_cluster.core.read_namespaced_persistent_volume_claim("up-isdr-data", namespace)

        kube_cluster.helm("upgrade", "up", str(CHART), "-n", namespace, "-f", pvc_values, *SHARED_CRDS)
        kube_cluster.helm("upgrade", "up", str(CHART), "-n", namespace, "--reset-then-reuse-values",
                          "--set", "config.POST_AFTER=45")
        assert status() == "deployed"
        config = kube_cluster.core.read_namespaced_config_map("up-isdr-config", namespace).data
        assert config["POST_AFTER"] == "45" and config["STORAGE"] == "local"
        assert config["SCP_ALLOWED_AE_TITLES"] == "CT01,PACS", "the values of the last release are kept"
        history = json.loads(kube_cluster.helm("history", "up", "-n", namespace, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["superseded"] * 4 + ["deployed"]
    finally:
        kube_cluster.helm("uninstall", "up", "-n", namespace, check=False)
        kube_cluster.delete_namespace(namespace)
