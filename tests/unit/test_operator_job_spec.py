"""The Job spec from the chart's values, as operator settings: where the pod runs, what it is
annotated with, its security contexts, and an INCOMING_DIR of its own (isdr_operator.jobs)."""

from __future__ import annotations

import json

import pytest

from isdr_operator.jobs import build_job
from isdr_operator.settings import load_operator_settings
from relay.lifecycle import TaskState
from tests.unit.test_operator_rules import KEY, env_of, fingerprint_body

TASK = TaskState(task_id="ct-organs-abc-1", fingerprint="ct-organs", generation=1)


def job_from(environ: dict) -> dict:
    settings = load_operator_settings("ns", environ)
    return build_job(task=TASK, key=KEY, series_name="series-abc", fingerprint_body=fingerprint_body(),
                     settings=settings.jobs, relay_get_timeout=7200)


def test_scheduling_values_reach_the_jobs_pod_as_given():
    tolerations = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    spec = job_from({
        "JOB_NODE_SELECTOR": json.dumps({"isdr.io/pool": "inference"}),
        "JOB_TOLERATIONS": json.dumps(tolerations),
        "JOB_AFFINITY": json.dumps(affinity),
        "JOB_PRIORITY_CLASS_NAME": "isdr-batch",
        "JOB_POD_ANNOTATIONS": json.dumps({"sidecar.istio.io/inject": "false"}),
        "JOB_POD_LABELS": json.dumps({"team": "radonc", "isdr.io/task": "spoofed"}),
    })
    template = spec["spec"]["template"]
    pod = template["spec"]
    assert pod["nodeSelector"] == {"isdr.io/pool": "inference"}
    assert pod["tolerations"] == tolerations and pod["affinity"] == affinity
    assert pod["priorityClassName"] == "isdr-batch"
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert template["metadata"]["labels"]["team"] == "radonc"
    assert template["metadata"]["labels"]["isdr.io/task"] == "ct-organs-abc-1", "the operator's labels win"


def test_without_scheduling_values_the_pod_has_none_of_those_fields():
    template = job_from({})["spec"]["template"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(template["spec"])
    assert "annotations" not in template["metadata"]


def test_security_contexts_come_from_the_chart_and_default_to_a_locked_down_non_root_pod():
    default = job_from({})["spec"]["template"]["spec"]
    assert default["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert "runAsUser" not in default["securityContext"], "no fixed user id: OpenShift assigns one"
    assert default["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    given = job_from({"JOB_POD_SECURITY_CONTEXT": json.dumps({"runAsNonRoot": True, "fsGroup": 2000}),
                      "JOB_SECURITY_CONTEXT": json.dumps({"allowPrivilegeEscalation": False})})["spec"]["template"]
    assert given["spec"]["securityContext"] == {"runAsNonRoot": True, "fsGroup": 2000}
    assert given["spec"]["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False}


@pytest.mark.parametrize("name,value,message", [
    ("JOB_TOLERATIONS", "{not json", "not valid JSON"),
    ("JOB_NODE_SELECTOR", "[]", "expected a JSON object"),
    ("JOB_TOLERATIONS", "{}", "expected a JSON array"),
])
def test_a_malformed_scheduling_setting_is_a_clear_error(name, value, message):
    with pytest.raises(ValueError, match=message):
        load_operator_settings("ns", {name: value})


def test_the_jobs_incoming_dir_is_its_own_never_the_operators():
    # The operator's INCOMING_DIR names its own mount (and, under a stand-in kubelet, a local
    # folder): the Job mounts the claim at /data and says so itself.
    pvc = job_from({"STORAGE_PVC_CLAIM": "isdr-data", "INCOMING_DIR": "/var/lib/elsewhere"})
    mounts = {m["name"]: m["mountPath"] for m in pvc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["storage"] == "/data" and env_of(pvc)["INCOMING_DIR"] == "/data"
    s3 = job_from({"STORAGE": "s3", "S3_BUCKET": "b", "INCOMING_DIR": "/var/lib/elsewhere"})
    assert env_of(s3)["INCOMING_DIR"] == "/tmp/isdr"


def test_with_the_charts_config_map_the_job_takes_its_settings_from_there_only():
    spec = job_from({"JOB_ENV_CONFIGMAP": "isdr-config", "GET_INTERVAL": "5", "LOG_LEVEL": "DEBUG"})
    env = env_of(spec)
    assert "GET_INTERVAL" not in env and "LOG_LEVEL" not in env
    assert {"configMapRef": {"name": "isdr-config"}} in spec["spec"]["template"]["spec"]["containers"][0]["envFrom"]
