"""An administrator's hand on a running `isdr run`: `isdr series list|retry|cancel` as processes
of their own, talking to the relay process through its storage (relay.admin_requests), with
dcmtk storescu sending, the InferenceServer emulator running the models and storescp receiving."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import storescu
from tests.support.emulator import EmulatorProcess
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until
from tests.support.s3 import relay_s3_env


def isdr(relay, *args, timeout=60):
    """`isdr ARGS` as an administrator runs it, beside the relay (same INCOMING_DIR)."""
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], env=relay.env, capture_output=True,
                          text=True, timeout=timeout)


def listed(relay) -> list[dict]:
    result = isdr(relay, "series", "list", "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send(relay, files):
    result = storescu(relay.port, files, called_ae=relay.ae_title)
    assert result.returncode == 0, result.stdout


def series_uid(files) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def phase_of(relay, uid):
    return next((row["phase"] for row in listed(relay) if row["seriesInstanceUID"] == uid), None)


def run_to_the_end(tmp_path, relay, url, model, pacs, count, phase):
    """`relay` started with one fingerprint `ct` (model `model`), sent a CT series of `count`
    instances, and left once the series is `phase`: returns the series' files and its UID."""
    relay.add_manifest(manifest("ct", url, model, pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=count, rows=32, cols=32)
    send(relay, series)
    uid = series_uid(series)
    wait_until(lambda: phase_of(relay, uid) == phase, what=f"series {phase}")
    return series, uid


def test_series_list_shows_phase_instances_tasks_and_age_without_patient_identifiers(
        tmp_path, emulator, pacs, relays):
    relay = relays(env={"DELETE_ON_POST": "false"})
    series, uid = run_to_the_end(tmp_path, relay, emulator.base_url, "toy", pacs, 3, "Succeeded")

    table = isdr(relay, "series", "list", "--tasks")

    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["SERIES", "MODALITY", "DESCRIPTION", "INSTANCES", "PHASE", "TASKS", "AGE"]
    assert row.split()[0] == uid and row.split()[1] == "CT"
    assert row.split()[-4:-1] == ["3", "Succeeded", "1/1"]
    assert "predictions delivered" in table.stdout
    patient = pydicom.dcmread(series[0], stop_before_pixels=True)
    for identifier in (patient.PatientName, patient.PatientID):
        assert str(identifier) not in table.stdout + json.dumps(listed(relay))


def test_a_failed_series_is_retried_through_the_fixed_fingerprint_from_the_instances_in_storage(
        tmp_path, emulator, pacs, relays):
    relay = relays()
    _series, uid = run_to_the_end(tmp_path, relay, emulator.base_url, "fail", pacs, 4, "Failed")

    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))  # the administrator fixes it
    retried = isdr(relay, "series", "retry", uid)

    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "dispatch #2 to ct with the 4 instance(s)" in retried.stdout
    assert len(pacs.wait_for_files(1)) == 1
    wait_until(lambda: phase_of(relay, uid) in (None, "Succeeded"), what="series succeeded")
    assert emulator.stats()["submits_by_model"] == {"fail": 1, "toy": 1}


def test_retry_is_refused_with_the_reason_for_a_series_with_nothing_failed(tmp_path, emulator, pacs, relays):
    relay = relays(env={"DELETE_ON_POST": "false"})
    _series, uid = run_to_the_end(tmp_path, relay, emulator.base_url, "toy", pacs, 2, "Succeeded")

    refused = isdr(relay, "series", "retry", uid)
    unknown = isdr(relay, "series", "retry", "1.2.3.4.5")

    assert refused.returncode == 1 and "no failed task to retry" in refused.stdout
    assert unknown.returncode == 1 and "knows no series 1.2.3.4.5" in unknown.stdout
    assert emulator.stats()["submits"] == 1


def test_without_a_running_relay_a_request_gets_no_answer_and_is_withdrawn(tmp_path, relays):
    relay = relays()
    (relay.data_dir / "state").mkdir(parents=True)

    result = isdr(relay, "series", "retry", "1.2.3.4.5", "--wait", "0.5")

    assert result.returncode == 3 and "withdrawn" in result.stderr
    assert not list((relay.data_dir / "state" / "requests").glob("*.json"))


@pytest.mark.parametrize("protocol, remote", [
    ("v1", "remote task {uid} deleted"),
    # A v2 server refuses to delete a task while it runs (HTTP 500): said, not hidden.
    ("v2", "remote task {uid} could not be deleted (it may run on): DELETE"),
])
def test_a_running_task_is_cancelled_and_its_remote_task_deleted(tmp_path, pacs, relays, protocol, remote):
    emulator = EmulatorProcess(tmp_path / "slow-emulator", delay=600)  # the model runs for ten minutes
    try:
        relay = relays()
        url = emulator.v1_tasks_url if protocol == "v1" else emulator.base_url
        relay.add_manifest(manifest("ct", url, "toy", pacs, protocol=protocol))
        relay.start()
        series = write_ct_series(tmp_path / "ct", count=2, rows=32, cols=32)
        send(relay, series)
        uid = series_uid(series)
        wait_until(lambda: any(t["phase"] == "Running" for row in listed(relay) for t in row["tasks"]),
                   what="task running")

        cancelled = isdr(relay, "series", "cancel", uid)

        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        wait_until(lambda: phase_of(relay, uid) == "Failed", what="series failed")
        task = listed(relay)[0]["tasks"][0]
        expected = "cancelled by an administrator; " + remote.format(uid=task["inferenceTaskUID"])
        assert task["message"].startswith(expected)
        assert emulator.stats()["deletes"] == 1 and emulator.stats()["submits"] == 1
        assert isdr(relay, "series", "cancel", uid).stdout.startswith("refused: the series has no running task")
        assert pacs.files() == []
    finally:
        emulator.stop()


def test_with_one_worker_a_high_priority_series_goes_before_the_waiting_backlog(tmp_path, pacs, relays):
    emulator = EmulatorProcess(tmp_path / "slow-emulator", delay=10)  # each model run takes 10 s
    try:
        relay = relays(env={"WORKERS": "1"})
        for name, priority in (("routine", 0), ("stroke", 100)):
            fingerprint = manifest(name, emulator.base_url, f"toy-{name}", pacs)
            fingerprint["spec"]["match"]["seriesDescription"] = name
            fingerprint["spec"]["priority"] = priority
            relay.add_manifest(fingerprint)
        relay.start()
        first = write_ct_series(tmp_path / "first", count=1, rows=16, cols=16, series_description="routine 1")
        send(relay, first)
        wait_until(lambda: phase_of(relay, series_uid(first)) == "Dispatched" and emulator.stats()["submits"] == 1,
                   what="the first routine task running (the only worker busy)")

        for name in ("routine 2", "routine 3", "stroke"):  # waiting behind it, the stroke series last
            send(relay, write_ct_series(tmp_path / name.replace(" ", ""), count=1, rows=16, cols=16,
                                        series_description=name))
        wait_until(lambda: sum(row["phase"] == "Dispatched" for row in listed(relay)) == 4, what="all dispatched")
        assert emulator.stats()["submits"] == 1, "the first task ended before the others waited: a slower machine?"

        wait_until(lambda: emulator.stats()["submits"] == 4, timeout=120, what="every task submitted")
        assert [t["model"] for t in emulator.stats()["tasks"]] == ["toy-routine", "toy-stroke", "toy-routine",
                                                                   "toy-routine"]
    finally:
        emulator.stop()


def test_an_unmatched_series_is_kept_and_rematched_once_its_fingerprint_is_added(tmp_path, emulator, pacs, relays):
    relay = relays(env={"UNMATCHED_RETENTION": "600"})
    relay.add_manifest(manifest("mr-only", emulator.base_url, "toy", pacs, modality="^MR$"))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
    send(relay, series)
    uid = series_uid(series)
    wait_until(lambda: phase_of(relay, uid) == "Unmatched", what="series kept unmatched")
    assert len(relay.stored_instances()) == 3
    assert isdr(relay, "series", "rematch", uid).stdout.startswith("refused: it still matches no fingerprint")

    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    rematched = isdr(relay, "series", "rematch", uid)

    assert rematched.returncode == 0, rematched.stdout + rematched.stderr
    assert "dispatch #1 to ct with the 3 instance(s)" in rematched.stdout
    assert len(pacs.wait_for_files(1)) == 1


def test_without_unmatched_retention_an_unmatched_series_is_gone_and_cannot_be_rematched(
        tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("mr-only", emulator.base_url, "toy", pacs, modality="^MR$"))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    send(relay, series)
    relay.wait_for_log("matches no fingerprint")

    refused = isdr(relay, "series", "rematch", series_uid(series))

    assert refused.returncode == 1 and "knows no series" in refused.stdout and not relay.stored_instances()


def test_with_s3_storage_the_commands_reach_the_relay_through_its_bucket(tmp_path, bucket, s3_server, emulator,
                                                                         pacs, relays):
    relay = relays(env=relay_s3_env(s3_server))
    _series, uid = run_to_the_end(tmp_path, relay, emulator.base_url, "fail", pacs, 2, "Failed")
    assert listed(relay)[0]["instances"] == 2 and relay.stored_instances() == []  # in the bucket

    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    retried = isdr(relay, "series", "retry", uid)

    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert len(pacs.wait_for_files(1)) == 1
