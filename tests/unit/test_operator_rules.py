"""The operator's pure parts: Job specs, conditions, fingerprint readiness, scheduling (its life-cycle
rules are relay.lifecycle's: tests/unit/test_lifecycle.py)."""

import json
import threading
import time

import pytest

from isdr_operator.fingerprints import evaluate
from isdr_operator.jobs import build_job
from isdr_operator.scheduler import Scheduler, SchedulerStuck, Work
from isdr_operator.settings import JobSettings, load_operator_settings
from relay.kube.job_contract import FINGERPRINT_CA_ENV, FINGERPRINT_ENV, JobExit
from relay.kube.resources import condition, job_outcome, same_conditions, set_condition, to_rfc3339
from relay.lifecycle import JobOutcome, TaskState
from relay.uids import SeriesKey

KEY = SeriesKey("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")


def fingerprint_body(**server):
    return {
        "apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint",
        "metadata": {"name": "ct-organs", "namespace": "isdr", "generation": 3, "resourceVersion": "7"},
        "spec": {"match": {"modality": "CT"},
                 "inferenceServer": {"url": "https://is.example", "protocol": "v2", "model": "m", **server},
                 "destinations": [{"host": "pacs", "port": 104, "aeTitle": "PACS"}]},
        "status": {"matchedSeries": 4},
    }


def job(settings=None, **server):
    task = TaskState(task_id="ct-organs-abc-1", fingerprint="ct-organs", generation=1)
    return build_job(task=task, key=KEY, series_name="series-abc", fingerprint_body=fingerprint_body(**server),
                     settings=settings or JobSettings(), relay_get_timeout=7200)


def env_of(spec):
    return {e["name"]: e["value"] for e in spec["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_job_is_named_after_the_task_and_labelled_with_series_and_fingerprint():
    spec = job()
    assert spec["metadata"]["name"] == "ct-organs-abc-1"
    labels = spec["metadata"]["labels"]
    assert labels["isdr.io/series"] == "series-abc" and labels["isdr.io/fingerprint"] == "ct-organs"
    assert spec["spec"]["template"]["metadata"]["labels"] == labels
    container = spec["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["isdr", "job"]
    assert container["args"][container["args"].index("--series-uid") + 1] == KEY.series_uid


def test_job_deadline_comes_from_the_fingerprints_timeout_plus_a_margin():
    assert job(timeoutSeconds=600)["spec"]["activeDeadlineSeconds"] == 600 + JobSettings().deadline_margin
    assert job()["spec"]["activeDeadlineSeconds"] == 7200 + JobSettings().deadline_margin


def test_a_task_that_failed_for_good_is_not_retried():
    rules = job()["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "task", "operator": "In",
                                                          "values": [JobExit.FAILED]}}]
    assert job()["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_job_carries_a_snapshot_of_the_fingerprint_without_its_status():
    snapshot = json.loads(env_of(job())[FINGERPRINT_ENV])
    assert snapshot["spec"]["inferenceServer"]["model"] == "m"
    assert "status" not in snapshot and "resourceVersion" not in snapshot["metadata"]


def test_job_has_no_api_access_and_a_locked_down_container():
    pod = job(JobSettings(service_account="isdr-job"))["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "isdr-job"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_job_storage_pvc_or_s3_secret_and_the_ca_bundles():
    settings = JobSettings(storage_pvc_claim="isdr-data", task_env={"INCOMING_DIR": "/data"},
                           ca_bundle_configmap="ca", ca_bundle_key="ca.pem", env_configmap="isdr-config")
    spec = job(settings, caBundle={"secretKeyRef": {"name": "is-ca", "key": "bundle.pem"}})
    pod = spec["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == "isdr-data" and mounts["storage"] == "/data"
    assert volumes["relay-ca"]["configMap"]["name"] == "ca" and mounts["relay-ca"] == "/etc/isdr/ca"
    assert volumes["fingerprint-ca"]["secret"]["secretName"] == "is-ca"
    assert env_of(spec)[FINGERPRINT_CA_ENV] == "/etc/isdr/fingerprint-ca/ca.pem"
    assert {"configMapRef": {"name": "isdr-config"}} in pod["containers"][0]["envFrom"]
    s3_job = job(JobSettings(s3_credentials_secret="s3"))
    s3 = s3_job["spec"]["template"]["spec"]
    assert {"secretRef": {"name": "s3"}} in s3["containers"][0]["envFrom"]
    assert all("persistentVolumeClaim" not in v for v in s3["volumes"])


def test_a_jobs_working_copies_stay_on_the_shared_volume_or_in_its_own_empty_dir():
    on_volume = job(JobSettings(storage_pvc_claim="isdr-data", task_env={"INCOMING_DIR": "/data"}))
    assert "WORK_DIR" not in env_of(on_volume)  # INCOMING_DIR/work: swept by the operator
    s3_job = job(JobSettings(s3_credentials_secret="s3"))
    assert env_of(s3_job)["WORK_DIR"] == "/tmp/work"
    mounts = s3_job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in mounts


def test_operator_settings_pass_the_relays_task_settings_to_jobs():
    settings = load_operator_settings("ns", {"JOB_IMAGE": "registry/isdr:1", "GET_INTERVAL": "5",
                                             "POST_AFTER": "3", "STORAGE_PVC_CLAIM": "c"})
    assert settings.jobs.image == "registry/isdr:1" and settings.jobs.storage_pvc_claim == "c"
    assert settings.jobs.task_env == {"GET_INTERVAL": "5"}  # POST_AFTER is the operator's business


@pytest.mark.parametrize("conditions, expected", [
    ([{"type": "Complete", "status": "True"}], (JobOutcome.COMPLETE, "")),
    ([{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 2"}],
     (JobOutcome.FAILED, "PodFailurePolicy: exit 2")),
    ([{"type": "Failed", "status": "False"}], (JobOutcome.RUNNING, "")),
    ([], (JobOutcome.RUNNING, "")),
])
def test_job_outcome(conditions, expected):
    assert job_outcome({"status": {"conditions": conditions}}) == expected


def test_condition_transition_time_moves_only_when_the_status_flips():
    first = set_condition(None, condition("Ready", True, "Valid", "ok", 1), now=100)
    again = set_condition(first, condition("Ready", True, "Valid", "still ok", 2), now=200)
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] == to_rfc3339(100)
    flipped = set_condition(again, condition("Ready", False, "InvalidRegex", "bad", 3), now=300)
    assert flipped[0]["lastTransitionTime"] == to_rfc3339(300) and flipped[0]["observedGeneration"] == 3
    assert same_conditions(first, set_condition(first, condition("Ready", True, "Valid", "ok", 1), 999))


def no_ca_problem(kind, name, key):
    return None


@pytest.mark.parametrize("change, reason", [
    ({"match": {"modality": "CT("}}, "InvalidRegex"),
    ({"match": {"seriesDescription": r"(t1)\s\1"}}, "UnsupportedRegex"),
    ({"match": {"exclude": "(?<!no )contrast", "modality": "CT("}}, "InvalidRegex"),
    ({"inferenceServer": {"url": "https://is", "model": "m", "caBundle": {"path": "/etc/ca.pem"}}},
     "UnsupportedCABundle"),
])
def test_fingerprints_that_cannot_be_used_are_not_ready(change, reason):
    body = fingerprint_body()
    body["spec"].update(change)
    evaluation = evaluate(body, no_ca_problem)
    assert (evaluation.ready, evaluation.reason) == (False, reason)


def test_a_ca_bundle_reference_must_resolve():
    body = fingerprint_body(caBundle={"configMapKeyRef": {"name": "ca", "key": "ca.pem"}})
    missing = evaluate(body, lambda kind, name, key: f"{kind} {name} not found")
    assert (missing.ready, missing.reason, missing.message) == (False, "CABundleNotFound", "ConfigMap ca not found")
    assert evaluate(body, no_ca_problem).ready


def test_scheduler_runs_each_series_when_due_and_keeps_the_earliest_poke():
    calls, done = [], threading.Event()

    def step(name):
        calls.append((name, time.monotonic()))
        if len(calls) == 3:
            done.set()
        return None

    scheduler = Scheduler(step)
    scheduler.start()
    try:
        start = time.monotonic()
        scheduler.poke("late", 0.3)
        scheduler.poke("soon", 0.05)
        scheduler.poke("late", 5.0)  # later than already wanted: ignored
        scheduler.poke("again", 0.1)
        scheduler.forget("again")
        scheduler.poke("third", 0.15)
        assert done.wait(3)
    finally:
        scheduler.stop()
    assert [name for name, _ in calls] == ["soon", "third", "late"]
    assert calls[-1][1] - start < 2


def test_scheduler_survives_a_failing_step_and_retries_it():
    attempts = []

    def step(name):
        attempts.append(name)
        if len(attempts) == 1:
            raise RuntimeError("API hiccup")
        return None

    scheduler = Scheduler(step, retry_after_error=0.05)
    scheduler.start()
    try:
        scheduler.poke("s")
        deadline = time.monotonic() + 3
        while len(attempts) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scheduler.stop()
    assert attempts == ["s", "s"]


def test_scheduler_health_fails_when_a_step_hangs_or_the_thread_is_gone():
    release, entered = threading.Event(), threading.Event()

    def step(name):
        entered.set()
        release.wait(5)  # a step wedged on something that never answers

    scheduler = Scheduler(step)
    with pytest.raises(SchedulerStuck, match="not running"):
        scheduler.health(stuck_after=60)
    scheduler.start()
    try:
        assert scheduler.health(stuck_after=60) == {"scheduled": 0, "step_running_for": 0.0, "active": True}
        scheduler.poke("s")
        assert entered.wait(3)
        time.sleep(0.05)
        assert scheduler.health(stuck_after=60)["step_running_for"] < 60
        with pytest.raises(SchedulerStuck, match="one series step has been running"):
            scheduler.health(stuck_after=0.01)
        release.set()
    finally:
        scheduler.stop()
    with pytest.raises(SchedulerStuck):
        scheduler.health(stuck_after=60)


class Clock:
    """A clock the test moves by hand: what is due is decided without waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def due_order(scheduler: Scheduler, count: int) -> list[str]:
    return [scheduler._next()[0] for _ in range(count)]


def pending(receiving=0, fresh=0, background=0, later=0) -> dict[str, int]:
    return {"receiving": receiving, "fresh": fresh, "background": background, "later": later}


def test_fresh_work_goes_before_a_backlog_of_old_series():
    clock = Clock()
    scheduler = Scheduler(lambda name: None, clock=clock)
    for index in range(100):
        scheduler.poke(f"old-{index}", work=Work.BACKGROUND)
    clock.now += 1
    scheduler.poke("new")  # wanted later than every old one, yet looked at first
    assert scheduler.pending() == pending(fresh=1, background=100)
    assert due_order(scheduler, 3) == ["new", "old-0", "old-1"]


def test_a_series_still_receiving_goes_before_the_progress_of_running_tasks():
    # Fifty Jobs finishing make fifty series fresh work; the series a sender has just completed
    # waits for its dispatch behind none of them.
    clock = Clock()
    scheduler = Scheduler(lambda name: None, clock=clock)
    for index in range(50):
        scheduler.poke(f"running-{index}")
    scheduler.poke("old", work=Work.BACKGROUND)
    clock.now += 2
    scheduler.poke("complete", work=Work.RECEIVING)
    assert scheduler.pending() == pending(receiving=1, fresh=50, background=1)
    assert due_order(scheduler, 2) == ["complete", "running-0"]


def test_a_more_urgent_poke_of_a_waiting_series_moves_it_up():
    clock = Clock()
    scheduler = Scheduler(lambda name: None, clock=clock)
    scheduler.poke("a", work=Work.BACKGROUND)
    scheduler.poke("b", work=Work.BACKGROUND)
    scheduler.poke("b", 5.0)  # fresh, though wanted later: it keeps the earlier time
    assert scheduler.pending() == pending(fresh=1, background=1)
    scheduler.poke("a", 5.0, work=Work.RECEIVING)
    scheduler.poke("a", work=Work.FRESH)  # less urgent than where it waits: it stays there
    assert scheduler.pending() == pending(receiving=1, fresh=1)
    assert due_order(scheduler, 2) == ["a", "b"]


def test_background_work_that_is_not_due_yet_does_not_hold_back_fresh_work():
    clock = Clock()
    scheduler = Scheduler(lambda name: None, clock=clock)
    scheduler.poke("forget-later", 3600.0, work=Work.BACKGROUND)
    scheduler.poke("dispatch-soon", 2.0, work=Work.RECEIVING)
    clock.now += 2
    assert due_order(scheduler, 1) == ["dispatch-soon"]
    assert scheduler.pending() == pending(later=1)


def look_again_after(work: Work) -> dict[str, int]:
    """The class of a series' next look, after a step of class `work` asked for one."""
    clock = Clock()
    scheduler = Scheduler(lambda name: 0.0, clock=clock)
    scheduler.poke("s", work=work)
    scheduler.take_step(*scheduler._next())
    return scheduler.pending()


def test_what_a_step_asks_for_stays_in_its_class_but_a_dispatch_is_followed_as_fresh_work():
    assert look_again_after(Work.BACKGROUND) == pending(background=1)
    assert look_again_after(Work.FRESH) == pending(fresh=1)
    # After its dispatch a series no longer waits before others: its Job's progress is fresh work.
    assert look_again_after(Work.RECEIVING) == pending(fresh=1)


def test_workers_step_series_side_by_side_but_never_one_series_twice_at_once():
    release = threading.Event()
    running: list[str] = []
    overlaps: list[str] = []
    lock = threading.Lock()

    def step(name):
        with lock:
            if name in running:
                overlaps.append(name)
            running.append(name)
        release.wait(5)  # each step waits for the API server
        with lock:
            running.remove(name)
        return None

    scheduler = Scheduler(step, workers=3)
    scheduler.start()
    try:
        scheduler.poke("a")
        scheduler.poke("b")
        wait = time.monotonic() + 3
        while len(running) < 2 and time.monotonic() < wait:
            time.sleep(0.01)
        assert sorted(running) == ["a", "b"]  # side by side
        scheduler.poke("a")  # while a's step runs: looked at again after it, not beside it
        time.sleep(0.1)
        assert sorted(running) == ["a", "b"] and scheduler.pending()["fresh"] == 1
        release.set()
        wait = time.monotonic() + 3
        while (running or scheduler.pending()["fresh"]) and time.monotonic() < wait:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert overlaps == [] and scheduler.pending() == pending()
