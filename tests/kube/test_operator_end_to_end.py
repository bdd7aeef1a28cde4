"""The Kubernetes mode end to end, against a real control plane.

kube-apiserver, etcd and kube-controller-manager (the real Job controller) run as processes; the
local node agent runs each Job's pod (`isdr job`) as a local process with the PVC mapped to a
shared folder. `isdr scp` and `isdr operator` run as processes too, dcmtk's storescu sends,
the InferenceServer emulator infers and dcmtk's storescp receives the predictions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from relay.kube.resources import LABEL_SERIES, resource_name
from relay.kube.resources import SERIES_PLURAL as PLURAL
from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import StoreSCP
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until, ManagedProcess, wait_for_port
from tests.support.prometheus import scrape

pytestmark = pytest.mark.kube

from tests.kube.relay_harness import REPO_ROOT, fingerprint_manifest, key_of


def test_fingerprint_to_predictions_through_one_job(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    assert r.apply(fingerprint_manifest("ct-organs", emulator, pacs)).returncode == 0
    wait_until(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                           for c in (r.fingerprint("ct-organs").get("status") or {}).get("conditions", [])),
               30, "the Fingerprint to be Ready")
    files = write_ct_series(tmp_path / "ct", count=6, rows=32, cols=32,
                            patient_name="Zebra^Quentin", patient_id="PID-4711-XYZ")
    key = key_of(files)

    last_sent = r.send(files)

    job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job for the series")
    dispatch_delay = job.metadata.creation_timestamp.timestamp() - last_sent
    labels = job.metadata.labels
    assert labels["isdr.io/fingerprint"] == "ct-organs" and labels[LABEL_SERIES] == resource_name(key)
    assert job.spec.backoff_limit == 2 and job.spec.ttl_seconds_after_finished == 600
    assert job.spec.active_deadline_seconds > 0
    kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Complete", timeout=120)

    (prediction,) = pacs.wait_for_files(1)
    import pydicom
    assert pydicom.dcmread(prediction).Modality == "RTSTRUCT"
    series = r.wait_series_phase(key, "Succeeded")
    (task,) = series["status"]["tasks"]
    assert task["phase"] == "Succeeded" and task["inferenceTaskUID"] and task["job"] == job.metadata.name
    assert series["status"]["progress"] == "1/1" and series["status"]["instances"] == 6
    wait_until(lambda: (r.series(key) or {}).get("status", {}).get("instancesDeleted"), 30, "clean-up")
    assert r.stored() == [] or all("state" in str(p) for p in r.stored())
    fingerprint_status = wait_until(lambda: (s := r.fingerprint("ct-organs")["status"]).get("succeededTasks") and s,
                                    30, "the fingerprint's counters")
    assert (fingerprint_status["matchedSeries"], fingerprint_status["succeededTasks"]) == (1, 1)
    reasons = r.reasons(resource_name(key), {"Dispatched", "TaskSucceeded", "Succeeded"})
    assert "PossibleDuplicateSubmit" not in reasons  # one submit, answered: nothing to flag
    r.reasons("ct-organs", "Matched")

    pod = kube_cluster.job_pods(r.namespace, job.metadata.name)[0]["metadata"]["name"]
    story = kube_cluster.pod_log(r.namespace, pod)
    for line in ("fetched 6 instances", "submitted 6 instances", "received 1 predictions",
                 f"stored 1 predictions to PACS@127.0.0.1:{pacs.port}", "deleted remote task"):
        assert line in story, story
    events = [e.to_dict() for e in r.events(resource_name(key)) + r.events("ct-organs")]
    everything = (json.dumps(series) + r.operator_log() + story + json.dumps(job.to_dict(), default=str)
                  + json.dumps(events, default=str) + r.scp_log())
    assert "Zebra" not in everything and "PID-4711" not in everything
    assert emulator.stats()["submits"] == 1
    status, health = r.health()
    assert status == 200 and "scheduled" in health["scheduler"], health
    import re
    from datetime import datetime
    stamp = re.search(r"^(\S+ \S+) INFO +isdr_operator.series: series \S+: created Job", r.operator_log(), re.M)
    created = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(f"\nlast instance acknowledged -> Job created: {created - last_sent:.2f}s with POST_AFTER=1s "
          f"(creationTimestamp: {dispatch_delay:.0f}s, whole seconds)")


def test_predictions_reach_a_mutual_tls_destination_with_certificates_from_secrets(
        kube_cluster, relay, peers, tmp_path):
    from tests.support.certificates import CertificateAuthority

    emulator, _ = peers
    pacs_ca = CertificateAuthority(tmp_path / "pacs-ca", "PACS CA")
    pacs_certificate = pacs_ca.issue("pacs", server=True)
    client_ca = CertificateAuthority(tmp_path / "client-ca", "ISDR client CA")
    client = client_ca.issue("isdr", client=True)
    secure = StoreSCP(tmp_path / "secure", ae_title="SECURE", tls=(pacs_certificate.certificate, pacs_certificate.key),
                      client_cas=[client_ca.certificate]).start()
    try:
        r = relay()
        kube_cluster.kubectl("create", "secret", "generic", "pacs-ca", "-n", r.namespace,
                             f"--from-file=ca.crt={pacs_ca.certificate}")
        kube_cluster.kubectl("create", "secret", "tls", "isdr-client", "-n", r.namespace,
                             f"--cert={client.certificate}", f"--key={client.key}")
        fingerprint = fingerprint_manifest("secure", emulator, secure)
        fingerprint["spec"]["destinations"][0]["tls"] = {
            "enabled": True, "caBundle": {"secretKeyRef": {"name": "pacs-ca", "key": "ca.crt"}},
            "clientCertificate": {"secretName": "isdr-client"}}
        assert r.apply(fingerprint).returncode == 0
        wait_until(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                               for c in (r.fingerprint("secure").get("status") or {}).get("conditions", [])),
                   30, "the Fingerprint to be Ready")
        files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        key = key_of(files)

        r.send(files)

        job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job for the series")
        kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Complete", timeout=120)
        (prediction,) = secure.wait_for_files(1)
        import pydicom

        study = pydicom.dcmread(prediction).ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == key.series_uid
        r.wait_series_phase(key, "Succeeded")
        volumes = {v.name for v in job.spec.template.spec.volumes}
        assert "destination-0-tls" in volumes
    finally:
        secure.stop()


def test_invalid_fingerprints_are_refused_or_not_ready(relay, peers):
    emulator, pacs = peers
    r = relay()
    bad_port = fingerprint_manifest("bad-port", emulator, pacs)
    bad_port["spec"]["destinations"][0]["port"] = 70000
    refused = r.apply(bad_port)
    assert refused.returncode != 0 and "65535" in (refused.stdout + refused.stderr)

    bad_regex = fingerprint_manifest("bad-regex", emulator, pacs, modality="CT(")
    assert r.apply(bad_regex).returncode == 0
    condition = wait_until(lambda: next((c for c in (r.fingerprint("bad-regex").get("status") or {})
                                         .get("conditions", []) if c["type"] == "Ready"), None),
                           30, "a Ready condition")
    assert condition["status"] == "False" and condition["reason"] == "InvalidRegex"

    backtracking = fingerprint_manifest("backtracking", emulator, pacs, modality="(CT)\\1")
    assert r.apply(backtracking).returncode == 0
    condition = wait_until(lambda: next((c for c in (r.fingerprint("backtracking").get("status") or {})
                                         .get("conditions", []) if c["type"] == "Ready"), None),
                           30, "a Ready condition")
    assert (condition["status"], condition["reason"]) == ("False", "UnsupportedRegex")
    assert "cannot be evaluated in linear time: backreferences are not supported" in condition["message"]

    missing_ca = fingerprint_manifest("missing-ca", emulator, pacs,
                                      caBundle={"configMapKeyRef": {"name": "nowhere", "key": "ca.pem"}})
    assert r.apply(missing_ca).returncode == 0
    condition = wait_until(lambda: next((c for c in (r.fingerprint("missing-ca").get("status") or {})
                                         .get("conditions", []) if c["type"] == "Ready"), None),
                           30, "a Ready condition")
    assert condition["status"] == "False" and condition["reason"] == "CABundleNotFound"


def test_failing_model_fails_the_job_and_reports_the_reason(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    r.apply(fingerprint_manifest("broken", emulator, pacs, model="fail"))
    files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    key = key_of(files)
    wait_until(lambda: r.fingerprint("broken").get("status"), 30, "the fingerprint to be seen")

    r.send(files)

    job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job")
    kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Failed", timeout=120)
    series = r.wait_series_phase(key, "Failed")
    message = series["status"]["tasks"][0]["message"]
    assert "crashed" in message or "552" in message, message
    r.reasons(resource_name(key), "TaskFailed")
    wait_until(lambda: r.fingerprint("broken")["status"].get("failedTasks") == 1, 30, "failedTasks")
    # A failure for good is not retried: one pod, one submit.
    assert len(kube_cluster.job_pods(r.namespace, job.metadata.name)) == 1
    assert emulator.stats()["submits"] == 1


def test_operator_killed_while_jobs_run_creates_no_duplicate(kube_cluster, relay, make_peers, tmp_path):
    emulator, pacs = make_peers(5.0)
    r = relay()
    r.apply(fingerprint_manifest("ct", emulator, pacs))
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
    key = key_of(files)
    r.send(files)
    wait_until(lambda: r.jobs(key), 60, "a Job")
    wait_until(lambda: emulator.stats()["submits"] == 1, 60, "the submit")

    r.operator.kill()
    r.start_operator()

    r.wait_series_phase(key, "Succeeded", timeout=120)
    pacs.wait_for_files(1)
    assert len(r.jobs(key)) == 1 and emulator.stats()["submits"] == 1
    assert len((r.series(key) or {})["status"]["tasks"]) == 1


def kill_the_pod_after_its_submit(kube_cluster, node_agent, r, emulator, key):
    """SIGKILL the first pod of the series' Job once the emulator has its submit: (Job, pod name)."""
    job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job")
    wait_until(lambda: emulator.stats()["submits"] == 1, 60, "the submit")
    first_pod = kube_cluster.job_pods(r.namespace, job.metadata.name)[0]["metadata"]["name"]
    pids = wait_until(lambda: node_agent.pod_pids(r.namespace, first_pod), 30, "the pod's process")
    os.kill(pids["task"], signal.SIGKILL)
    return job, first_pod


def test_job_pod_killed_while_polling_resumes_without_a_second_submit(kube_cluster, node_agent, relay, make_peers,
                                                                   tmp_path):
    emulator, pacs = make_peers(6.0)
    r = relay()
    r.apply(fingerprint_manifest("ct", emulator, pacs))
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
    key = key_of(files)
    r.send(files)

    job, first_pod = kill_the_pod_after_its_submit(kube_cluster, node_agent, r, emulator, key)

    kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Complete", timeout=180)
    pods = kube_cluster.job_pods(r.namespace, job.metadata.name)
    assert len(pods) == 2
    second = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"] != first_pod)
    assert "resuming" in kube_cluster.pod_log(r.namespace, second)
    pacs.wait_for_files(1)
    assert emulator.stats()["submits"] == 1
    r.wait_series_phase(key, "Succeeded")


def test_fingerprint_edited_and_deleted_while_its_task_runs(kube_cluster, relay, make_peers, tmp_path):
    emulator, pacs = make_peers(4.0)
    r = relay()
    # No pod may start yet: the Job exists and its task stays Pending (no pod, no record), the
    # moment in which a deleted fingerprint used to fail it as if no Job had been created.
    quota = {"metadata": {"name": "no-pods-yet"}, "spec": {"hard": {"pods": "0"}}}
    kube_cluster.core.create_namespaced_resource_quota(r.namespace, quota)
    r.apply(fingerprint_manifest("ct", emulator, pacs))
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    key = key_of(files)
    r.send(files)
    wait_until(lambda: r.jobs(key), 60, "a Job")
    assert [t["phase"] for t in r.series(key)["status"]["tasks"]] == ["Pending"]

    # Edited (to a model that would fail), then deleted, while the task waits for its pod.
    kube_cluster.kubectl("patch", "fingerprint", "ct", "-n", r.namespace, "--type=merge",
                         "-p", '{"spec": {"inferenceServer": {"model": "fail"}}}')
    kube_cluster.kubectl("delete", "fingerprint", "ct", "-n", r.namespace, "--wait=true")
    wait_until(lambda: "fingerprint ct deleted" in r.operator_log(), 30, "the operator to see the deletion")
    kube_cluster.kubectl("annotate", PLURAL, resource_name(key), "-n", r.namespace, "test/look=again")  # a step
    time.sleep(2)
    assert [t["phase"] for t in r.series(key)["status"]["tasks"]] == ["Pending"], r.operator_log()[-3000:]
    kube_cluster.core.delete_namespaced_resource_quota("no-pods-yet", r.namespace)

    # The Job carries the fingerprint as dispatched: it finishes, and the series with it.
    r.wait_series_phase(key, "Succeeded", timeout=120)
    pacs.wait_for_files(1)


def test_unmatched_series_is_deleted_with_its_instances(relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    r.apply(fingerprint_manifest("mr-only", emulator, pacs, modality="^MR$"))
    wait_until(lambda: r.fingerprint("mr-only").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    key = key_of(files)

    r.send(files)

    wait_until(lambda: r.series(key), 30, "the DicomSeries")
    wait_until(lambda: r.series(key) is None, 60, "the unmatched series to be deleted")
    assert r.stored() == [] and r.jobs(key) == [] and emulator.stats()["submits"] == 0


def test_the_same_flow_with_s3_storage(kube_cluster, relay, peers, bucket, s3_server, tmp_path):
    from tests.support.s3 import CREDENTIALS, relay_s3_env

    emulator, pacs = peers
    # The Jobs get the bucket's credentials from a Secret, as the chart's S3 mode does.
    r = relay(**relay_s3_env(s3_server), STORAGE_PVC_CLAIM="", S3_CREDENTIALS_SECRET="s3-credentials")
    namespace = r.namespace
    kube_cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"}, "stringData": CREDENTIALS})
    r.apply(fingerprint_manifest("ct", emulator, pacs))
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=4, rows=16, cols=16)
    key = key_of(files)

    r.send(files)

    series = wait_until(lambda: r.series(key), 30, "the DicomSeries")
    assert series["spec"]["storage"]["type"] == "s3" and series["spec"]["storage"]["bucket"] == "isdr-test"
    assert r.stored() == []  # nothing on the shared folder: the instances are in the bucket
    job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "a Job")
    assert job.spec.template.spec.volumes is None or all(
        v.persistent_volume_claim is None for v in job.spec.template.spec.volumes)
    kube_cluster.wait_job_condition(namespace, job.metadata.name, "Complete", timeout=120)
    pacs.wait_for_files(1)
    assert emulator.stats()["tasks"][0]["input_files"] == 4
    r.wait_series_phase(key, "Succeeded")
    wait_until(lambda: not [i for i in bucket.list("series/")], 30, "the instances deleted from the bucket")


def series_for(r, emulator, pacs, tmp_path, count=3):
    """A Fingerprint for the emulator's toy model, seen by the operator, and a series it matches."""
    r.apply(fingerprint_manifest("ct", emulator, pacs))
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
    files = write_ct_series(tmp_path / "ct", count=count, rows=16, cols=16)
    return files, key_of(files)


def late_instance(files, tmp_path, count=1):
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return write_ct_series(tmp_path / "late", count=count, rows=16, cols=16, series_uid=first.SeriesInstanceUID,
                           study_uid=first.StudyInstanceUID)


def only_state(paths) -> bool:
    return all("state" in str(p) or "work" in str(p) for p in paths)


def test_a_new_instance_after_the_dispatch_runs_the_series_again_with_all_its_instances(relay, make_peers,
                                                                                       tmp_path):
    emulator, pacs = make_peers(3.0)
    r = relay()  # LATE_INSTANCE_POLICY defaults to reopen
    files, key = series_for(r, emulator, pacs, tmp_path)
    r.send(files)
    wait_until(lambda: emulator.stats()["submits"] == 1, 60, "the first submit")

    r.send(late_instance(files, tmp_path))  # the series was incomplete

    wait_until(lambda: sorted(t["input_files"] or 0 for t in emulator.stats()["tasks"]) == [3, 4], 90,
               f"a second run with all 4 instances\n{r.operator_log()[-3000:]}")
    series = wait_until(lambda: (s := r.series(key)) and s["status"].get("phase") == "Succeeded"
                        and s["status"].get("generation") == 2 and s, 120, "the second generation to finish")
    assert [t["generation"] for t in series["status"]["tasks"]] == [1, 2]
    assert len(r.jobs(key)) == 2 and series["status"]["progress"] == "1/1"
    r.reasons(resource_name(key), "LateInstances")
    wait_until(lambda: only_state(r.stored()), 30, "every instance deleted once both runs finished")
    assert len(pacs.wait_for_files(2)) == 2


def test_a_resent_series_after_the_dispatch_runs_nothing_again(relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    files, key = series_for(r, emulator, pacs, tmp_path)
    r.send(files)
    r.wait_series_phase(key, "Succeeded")

    r.send(files)  # the sender sends the whole series again

    wait_until(lambda: "DuplicateInstances" in {e.reason for e in r.events(resource_name(key))}, 60,
               f"the duplicates noticed\n{r.operator_log()[-3000:]}")
    wait_until(lambda: only_state(r.stored()), 30, "the duplicates deleted")
    time.sleep(3)
    assert len(r.jobs(key)) == 1 and emulator.stats()["submits"] == 1 and len(pacs.files()) == 1


def test_with_the_ignore_policy_a_late_instance_is_kept_unrun_until_the_retention(relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay(LATE_INSTANCE_POLICY="ignore", SERIES_RETENTION="8")
    files, key = series_for(r, emulator, pacs, tmp_path)
    r.send(files)
    r.wait_series_phase(key, "Succeeded")
    wait_until(lambda: (r.series(key) or {}).get("status", {}).get("instancesDeleted"), 30, "clean-up")

    r.send(late_instance(files, tmp_path))

    series = wait_until(lambda: (s := r.series(key)) and s["status"].get("lateInstances") and s, 30,
                        "the late instance to be noticed")
    assert series["status"]["phase"] == "Succeeded"
    r.reasons(resource_name(key), "LateInstances")
    assert len([p for p in r.stored() if p.suffix == ".dcm" and "series" in p.parts]) == 1  # kept, unrun
    wait_until(lambda: r.series(key) is None, 60, "the series forgotten after SERIES_RETENTION")
    assert only_state(r.stored()) and "never run" in r.operator_log()
    assert len(r.jobs(key)) == 1 and emulator.stats()["submits"] == 1


def test_a_receiver_killed_mid_series_is_reconciled_from_storage(kube_cluster, relay, peers, tmp_path):
    from urllib.parse import urlparse

    from tests.kube.test_scp_publisher import proxied_kubeconfig
    from tests.support.tcp_proxy import TcpProxy

    emulator, pacs = peers
    r = relay(POST_AFTER="4")
    files, key = series_for(r, emulator, pacs, tmp_path, count=6)
    server = urlparse(kube_cluster.server)
    with TcpProxy(server.hostname, server.port) as proxy:
        # This receiver reaches the API through a proxy the test can cut.
        r.scp.stop()
        env = {**r.env, "KUBECONFIG": str(proxied_kubeconfig(kube_cluster.kubeconfig, proxy.port,
                                                               tmp_path / "proxied.kubeconfig"))}
        scp = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", r.namespace],
                             r.workdir / "scp-proxied.log", env=env, cwd=REPO_ROOT)
        wait_for_port(r.scp_port, process=scp.popen, timeout=60)
        r.send(files[:2])
        wait_until(lambda: ((r.series(key) or {}).get("status") or {}).get("instances") == 2, 30, "2 published")
        proxy.pause("refuse")
        r.send(files[2:])  # acknowledged and stored; the DicomSeries still says 2
        scp.kill()
        proxy.resume()

        # The operator dispatches what storage holds, not the 2 the DicomSeries says.
        r.wait_series_phase(key, "Succeeded", timeout=120)
        assert [t["input_files"] for t in emulator.stats()["tasks"]] == [6]
        r.scp = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", r.namespace],
                               r.workdir / "scp-2.log", env=env, cwd=REPO_ROOT)
        wait_for_port(r.scp_port, process=r.scp.popen, timeout=60)
        time.sleep(3)
        assert emulator.stats()["submits"] == 1 and len(r.jobs(key)) == 1


def test_a_job_pod_killed_while_its_submit_is_in_flight_submits_once_more_and_says_so(
        kube_cluster, node_agent, relay, make_peers, tmp_path):
    from tests.support.tcp_proxy import TcpProxy

    emulator, pacs = make_peers(2.0)
    with TcpProxy("127.0.0.1", emulator.port) as proxy:
        proxy.hold_answers_to(b"POST")  # the server stores the task; the pod never hears of it
        from tests.kube.test_metrics_on_kubernetes import MeteredRelay

        r = relay(MeteredRelay, POST_TIMEOUT="120")
        r.apply(manifest("ct", f"http://127.0.0.1:{proxy.port}", "toy", pacs, modality="^CT$"))
        wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")
        files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        key = key_of(files)
        r.send(files)

        job, first_pod = kill_the_pod_after_its_submit(kube_cluster, node_agent, r, emulator, key)
        proxy.hold_answers_to()  # the next pod's answer comes through

        r.wait_series_phase(key, "Succeeded", timeout=180)
    assert emulator.stats()["submits"] == 2 and len(pacs.wait_for_files(1)) == 1
    second = next(p["metadata"]["name"] for p in kube_cluster.job_pods(r.namespace, job.metadata.name)
                  if p["metadata"]["name"] != first_pod)
    assert "WARNING possible duplicate" in kube_cluster.pod_log(r.namespace, second)
    r.reasons(resource_name(key), "PossibleDuplicateSubmit")
    # The pod's count is never scraped: the operator counts the repeat it learnt of.
    assert scrape(r.operator_metrics)[1][("isdr_possible_duplicate_submits_total", ())] == 1
