"""An administrator's requests on Kubernetes: `kubectl annotate dicomseries NAME isdr.io/retry=...`
and `isdr.io/cancel=...`, carried out by the operator against a real control plane, with Jobs run
by the local node agent, dcmtk sending and receiving and the InferenceServer emulator."""

from __future__ import annotations

import pytest

from isdr_devtools.synthetic import write_ct_series
from relay.kube.resources import resource_name
from tests.kube.relay_harness import fingerprint_manifest, key_of
from tests.support.emulator import EmulatorProcess
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until

pytestmark = pytest.mark.kube


def annotate(kube_cluster, r, key, annotation):
    kube_cluster.kubectl("annotate", "-n", r.namespace, "dicomseries", resource_name(key), annotation, "--overwrite")


def answer(r, key, action, value):
    return wait_until(lambda: ((a := r.series(key)["status"].get("requests", {}).get(action)) or {}).get("value")
                      == value and a, 60, f"the answer to {action}={value}\n{r.operator_log()[-3000:]}")


def series_sent_to(r, fingerprint, tmp_path, count, phase):
    """`fingerprint` applied and seen by the operator, a CT series of `count` instances sent; once
    the series is `phase`, its key."""
    r.apply(fingerprint)
    name = fingerprint["metadata"]["name"]
    wait_until(lambda: r.fingerprint(name).get("status"), 30, f"fingerprint {name} to be seen")
    files = write_ct_series(tmp_path / "ct", count=count, rows=16, cols=16)
    r.send(files)
    r.wait_series_phase(key_of(files), phase)
    return key_of(files)


def test_a_failed_series_is_retried_by_annotation_once_per_value(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    key = series_sent_to(r, fingerprint_manifest("ct", emulator, pacs, model="fail"), tmp_path, 3, "Failed")
    r.apply(fingerprint_manifest("ct", emulator, pacs, model="toy"))  # the administrator fixes it
    wait_until(lambda: r.fingerprint("ct")["status"].get("observedGeneration") == 2, 30, "the fix to be seen")

    annotate(kube_cluster, r, key, "isdr.io/retry=1")

    retried = answer(r, key, "retry", "1")
    assert retried["accepted"] and "dispatch #2 to ct with the 3 instance(s)" in retried["message"]
    assert len(pacs.wait_for_files(1)) == 1
    series = r.wait_series_phase(key, "Succeeded")
    assert [t["phase"] for t in series["status"]["tasks"]] == ["Failed", "Succeeded"]
    r.reasons(resource_name(key), {"Retried", "TaskSucceeded"})

    annotate(kube_cluster, r, key, "isdr.io/retry=2")

    refused = answer(r, key, "retry", "2")
    assert not refused["accepted"] and "no failed task" in refused["message"]
    assert emulator.stats()["submits_by_model"] == {"fail": 1, "toy": 1}
    assert len(r.jobs(key)) == 2


def test_a_running_task_is_cancelled_by_annotation_its_job_and_remote_task_deleted(
        kube_cluster, relay, tmp_path, make_peers):
    _, pacs = make_peers(1.0)
    emulator = EmulatorProcess(tmp_path / "slow-emulator", delay=600)
    try:
        r = relay()
        r.apply(manifest("ct", emulator.v1_tasks_url, "toy", pacs, protocol="v1", modality="^CT$"))
        files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        key = key_of(files)
        wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
        r.send(files)
        # The InferenceServer has the task (the series' entry learns its uid only at the Job's next change).
        wait_until(lambda: emulator.stats()["submits"] == 1, 120, "the task to be submitted")

        annotate(kube_cluster, r, key, "isdr.io/cancel=now")

        cancelled = answer(r, key, "cancel", "now")
        assert cancelled["accepted"], cancelled
        series = r.wait_series_phase(key, "Failed")
        (task,) = series["status"]["tasks"]
        (remote,) = emulator.stats()["tasks"]
        assert task["message"] == f"cancelled by an administrator; remote task {remote['uid']} deleted"
        wait_until(lambda: not r.jobs(key), 60, "the Job to be deleted")
        assert emulator.stats()["deletes"] == 1 and emulator.stats()["submits"] == 1
        r.reasons(resource_name(key), "Cancelled")
    finally:
        emulator.stop()


def test_a_fingerprints_priority_class_reaches_its_jobs_pod_and_the_crd_bounds_its_priority(
        kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    classes = "/apis/scheduling.k8s.io/v1/priorityclasses"
    name = f"isdr-urgent-{r.namespace}"[:63]
    kube_cluster.rest.post(classes, {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                     "metadata": {"name": name}, "value": 100000})
    try:
        stroke = fingerprint_manifest("stroke", emulator, pacs)
        stroke["spec"].update(priority=100, priorityClassName=name)
        assert r.apply(stroke).returncode == 0
        too_high = fingerprint_manifest("too-high", emulator, pacs)
        too_high["spec"]["priority"] = 5000
        refused = r.apply(too_high)
        assert refused.returncode != 0 and "spec.priority" in refused.stderr
        files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        key = key_of(files)
        wait_until(lambda: r.fingerprint("stroke").get("status"), 30, "the fingerprint to be seen")

        r.send(files)

        job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job")
        assert job.spec.template.spec.priority_class_name == name
        pod = wait_until(lambda: kube_cluster.job_pods(r.namespace, job.metadata.name), 60, "its pod")[0]
        assert pod["spec"]["priority"] == 100000  # resolved by the API server's Priority admission
        r.wait_series_phase(key, "Succeeded")
    finally:
        kube_cluster.rest.delete(f"{classes}/{name}", ok_missing=True)


def test_an_unmatched_series_is_kept_and_matched_again_once_its_fingerprint_is_applied(
        kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay(UNMATCHED_RETENTION="600")
    key = series_sent_to(r, fingerprint_manifest("mr-only", emulator, pacs, modality="^MR$"), tmp_path, 2,
                         "Unmatched")
    assert len(r.stored()) == 2
    r.reasons(resource_name(key), "Unmatched")

    r.apply(fingerprint_manifest("ct", emulator, pacs))  # the fingerprint that was missing
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the new fingerprint to be seen")
    annotate(kube_cluster, r, key, "isdr.io/rematch=1")

    rematched = answer(r, key, "rematch", "1")
    assert rematched["accepted"] and "dispatch #1 to ct with the 2 instance(s)" in rematched["message"]
    assert len(pacs.wait_for_files(1)) == 1
    r.wait_series_phase(key, "Succeeded")
