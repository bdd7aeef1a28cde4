"""Study-level fingerprints on Kubernetes, against a real control plane: the series of one study
arrive over separate associations, each becomes a DicomSeries, and one Job posts them together.

The same peers as tests/kube/test_operator_end_to_end.py: kube-apiserver, etcd and the real Job
controller, `isdr scp` and `isdr operator` as processes, Job pods through the local node agent,
dcmtk storescu and storescp, the InferenceServer emulator.
"""

from __future__ import annotations

import json

import pytest
from pydicom.uid import generate_uid

from relay.kube.resources import LABEL_STUDY, resource_name, study_label
from tests.kube.relay_harness import Relay, key_of
from tests.support.processes import wait_until
from tests.support.studies import mr_series as write_mr_series
from tests.support.studies import prostate_manifest

pytestmark = pytest.mark.kube


def prostate(emulator, pacs, **settings):
    return prostate_manifest(emulator.base_url, pacs, **settings)


def mr_series(folder, description, study, count):
    return write_mr_series(folder, description, study, count, patient_name="Zebra^Quentin", patient_id="PID-4711-XYZ")


def ready(r: Relay, name: str) -> None:
    wait_until(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                           for c in (r.fingerprint(name).get("status") or {}).get("conditions", [])),
               30, f"the Fingerprint {name} to be Ready")


def tasks(r: Relay, key) -> list[dict]:
    return ((r.series(key) or {}).get("status") or {}).get("tasks") or []


def test_two_series_of_one_study_over_separate_associations_run_as_one_job(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    assert r.apply(prostate(emulator, pacs)).returncode == 0
    ready(r, "prostate")
    listed = kube_cluster.kubectl("get", "fingerprints", "-n", r.namespace).stdout
    assert listed.split()[1] == "LEVEL" and "Study" in listed.splitlines()[1]
    study = generate_uid()
    t2 = mr_series(tmp_path / "t2", "T2 tra", study, 3)
    adc = mr_series(tmp_path / "adc", "ADC", study, 2)

    r.send(t2)
    wait_until(lambda: [t.get("phase") for t in tasks(r, key_of(t2))] == ["Waiting"], 60,
               f"the T2 series to wait for its study\n{r.operator_log()[-3000:]}")
    assert emulator.stats()["submits"] == 0
    r.send(adc)

    selector = f"{LABEL_STUDY}={study_label(study)}"
    job = wait_until(lambda: (jobs := kube_cluster.batch.list_namespaced_job(
        r.namespace, label_selector=selector).items) and jobs, 90, f"the study's Job\n{r.operator_log()[-3000:]}")
    (job,) = job
    kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Complete", timeout=120)
    (task,) = emulator.stats()["tasks"]
    assert task["input_folders"] == {"t2": 3, "adc": 2}
    assert task["input_series"] == sorted([key_of(t2).series_uid, key_of(adc).series_uid])
    assert len(pacs.wait_for_files(2)) == 2
    for files, entry in ((t2, "t2"), (adc, "adc")):
        series = r.wait_series_phase(key_of(files), "Succeeded")
        (done,) = series["status"]["tasks"]
        assert (done["taskId"], done["job"], done["entry"], done["phase"]) == (
            job.metadata.name, job.metadata.name, entry, "Succeeded")
        assert series["metadata"]["labels"][LABEL_STUDY] == study_label(study)
    r.reasons(resource_name(key_of(adc)), "StudyStarted")
    pod = kube_cluster.job_pods(r.namespace, job.metadata.name)[0]["metadata"]["name"]
    story = kube_cluster.pod_log(r.namespace, pod)
    assert "submitted 5 instances of study task with t2" in story, story
    everything = (r.operator_log() + story + r.scp_log() + json.dumps(job.to_dict(), default=str)
                  + json.dumps([r.series(key_of(f)) for f in (t2, adc)]))
    assert "Zebra" not in everything and "PID-4711" not in everything


def test_a_missing_series_fails_the_study_after_its_timeout(relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    assert r.apply(prostate(emulator, pacs, timeout=3, on_timeout="fail")).returncode == 0
    ready(r, "prostate")
    t2 = mr_series(tmp_path / "t2", "T2 tra", generate_uid(), 2)

    r.send(t2)

    series = r.wait_series_phase(key_of(t2), "Failed", timeout=90)
    (task,) = series["status"]["tasks"]
    assert task["phase"] == "Failed" and "no series for adc (onTimeout: fail)" in task["message"]
    assert emulator.stats()["submits"] == 0
    r.reasons(resource_name(key_of(t2)), "StudyFailed")


def test_the_api_server_refuses_duplicate_entry_names_and_a_study_without_its_level(relay, peers):
    emulator, pacs = peers
    r = relay()
    duplicate = prostate(emulator, pacs)
    duplicate["spec"]["study"]["series"][1]["name"] = "t2"
    refused = r.apply(duplicate)
    assert refused.returncode != 0 and "the names of spec.study.series must be unique" in refused.stderr
    levelless = prostate(emulator, pacs)
    del levelless["spec"]["level"]
    refused = r.apply(levelless)
    assert refused.returncode != 0 and "go together" in refused.stderr
    empty = prostate(emulator, pacs)
    empty["spec"]["study"]["series"] = []
    assert r.apply(empty).returncode != 0


def test_an_operator_killed_while_a_study_waits_starts_it_whole_after_its_restart(kube_cluster, relay, peers,
                                                                                 tmp_path):
    emulator, pacs = peers
    r = relay()
    assert r.apply(prostate(emulator, pacs)).returncode == 0
    ready(r, "prostate")
    study = generate_uid()
    t2 = mr_series(tmp_path / "t2", "T2 tra", study, 2)
    r.send(t2)
    wait_until(lambda: [t.get("phase") for t in tasks(r, key_of(t2))] == ["Waiting"], 60, "the T2 share")

    r.operator.kill()
    adc = mr_series(tmp_path / "adc", "ADC", study, 1)
    r.send(adc)  # while no operator runs
    r.start_operator()

    for files in (t2, adc):
        r.wait_series_phase(key_of(files), "Succeeded", timeout=120)
    (task,) = emulator.stats()["tasks"]
    assert task["input_folders"] == {"t2": 2, "adc": 1}
    selector = f"{LABEL_STUDY}={study_label(study)}"
    assert len(kube_cluster.batch.list_namespaced_job(r.namespace, label_selector=selector).items) == 1


def test_two_studies_sent_interleaved_run_as_two_jobs_that_never_mix(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay()
    assert r.apply(prostate(emulator, pacs)).returncode == 0
    ready(r, "prostate")
    first, second = generate_uid(), generate_uid()
    a_t2, b_t2 = mr_series(tmp_path / "a-t2", "T2", first, 2), mr_series(tmp_path / "b-t2", "T2", second, 3)
    a_adc, b_adc = mr_series(tmp_path / "a-adc", "ADC", first, 1), mr_series(tmp_path / "b-adc", "ADC", second, 2)

    for files in (a_t2, b_t2, a_adc, b_adc):
        r.send(files)

    for files in (a_t2, b_t2, a_adc, b_adc):
        r.wait_series_phase(key_of(files), "Succeeded", timeout=120)
    sent = sorted((tuple(task["input_series"]), task["input_folders"]["t2"], task["input_folders"]["adc"])
                  for task in emulator.stats()["tasks"])
    assert sent == sorted([(tuple(sorted([key_of(a_t2).series_uid, key_of(a_adc).series_uid])), 2, 1),
                           (tuple(sorted([key_of(b_t2).series_uid, key_of(b_adc).series_uid])), 3, 2)])
    for study in (first, second):
        selector = f"{LABEL_STUDY}={study_label(study)}"
        assert len(kube_cluster.batch.list_namespaced_job(r.namespace, label_selector=selector).items) == 1
