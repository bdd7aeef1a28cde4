"""Study-level fingerprints with `isdr run`: dcmtk storescu -> relay -> InferenceServer emulator ->
dcmtk storescp, every peer a real process.

The series of one study arrive in any order, each over an association of its own, and are posted
together in one task; the emulator says which folders and series that task was sent.
"""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import generate_uid

from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import storescu
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until
from tests.support.studies import mr_series as write_mr_series
from tests.support.studies import prostate_manifest

STUDY_DESCRIPTION = "MR Prostate"


def prostate(url, pacs, **settings):
    return prostate_manifest(url, pacs, study_description="prostate", **settings)


def mr_series(folder, description, study_uid, count):
    return write_mr_series(folder, description, study_uid, count, study_description=STUDY_DESCRIPTION)


def series_uid(files):
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def send(relay, files):
    """One storescu run: one association of its own."""
    result = storescu(relay.port, files, called_ae=relay.ae_title)
    assert result.returncode == 0, result.stdout
    return files


def send_and_wait_for_its_share(relay, files, shares_before):
    send(relay, files)
    relay.wait_for_log(r"waiting for the rest of its study for prostate", count=shares_before + 1)


def submitted_tasks(emulator, count):
    stats = wait_until(lambda: (s := emulator.stats())["submits"] >= count
                       and all(t["input_files"] is not None for t in s["tasks"]) and s, what=f"{count} task(s) read")
    assert stats["submits"] == count, stats["tasks"]
    return stats["tasks"]


@pytest.mark.parametrize("first", ["t2", "adc"])
def test_two_series_of_one_study_sent_in_either_order_become_one_task_with_both(tmp_path, emulator, pacs,
                                                                                  relays, first):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs))
    relay.start()
    study = generate_uid()
    series = {"t2": mr_series(tmp_path / "t2", "T2 tse tra", study, 3),
              "adc": mr_series(tmp_path / "adc", "ep2d ADC", study, 2)}
    second = "adc" if first == "t2" else "t2"

    send_and_wait_for_its_share(relay, series[first], 0)  # complete, and waiting for the rest
    assert emulator.stats()["submits"] == 0
    send(relay, series[second])

    (task,) = submitted_tasks(emulator, 1)
    assert task["protocol"] == "v2"
    assert task["input_folders"] == {"t2": 3, "adc": 2}
    assert task["input_series"] == sorted(series_uid(files) for files in series.values())
    predictions = [pydicom.dcmread(p) for p in pacs.wait_for_files(2)]  # the toy model: one per series
    assert {ds.StudyInstanceUID for ds in predictions} == {study}
    wait_until(lambda: not relay.stored_instances(), what="instances deleted once delivered")
    documents = relay.state_documents()
    assert len({task["task_id"] for doc in documents for task in doc["tasks"]}) <= 1
    assert "study task prostate-" in relay.log()


def test_protocol_v1_posts_the_study_as_one_flat_zip(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.v1_tasks_url, pacs, protocol="v1"))
    relay.start()
    study = generate_uid()

    send(relay, mr_series(tmp_path / "t2", "T2 tse tra", study, 3) + mr_series(tmp_path / "adc", "ADC", study, 2))

    (task,) = submitted_tasks(emulator, 1)
    assert task["protocol"] == "v1" and task["input_folders"] == {"": 5} and len(task["input_series"]) == 2
    pacs.wait_for_files(2)


def test_two_studies_sent_interleaved_stay_apart(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs))
    relay.start()
    first, second = generate_uid(), generate_uid()
    a_t2 = mr_series(tmp_path / "a-t2", "T2 tra", first, 2)
    b_t2 = mr_series(tmp_path / "b-t2", "T2 tra", second, 3)
    a_adc = mr_series(tmp_path / "a-adc", "ADC", first, 1)
    b_adc = mr_series(tmp_path / "b-adc", "ADC", second, 2)

    send_and_wait_for_its_share(relay, a_t2, 0)
    send_and_wait_for_its_share(relay, b_t2, 1)
    send(relay, a_adc)
    send(relay, b_adc)

    tasks = submitted_tasks(emulator, 2)
    sent = sorted((tuple(task["input_series"]), task["input_folders"]["t2"], task["input_folders"]["adc"])
                  for task in tasks)
    assert sent == sorted([(tuple(sorted([series_uid(a_t2), series_uid(a_adc)])), 2, 1),
                           (tuple(sorted([series_uid(b_t2), series_uid(b_adc)])), 3, 2)])


def test_a_missing_series_with_on_timeout_run_posts_what_is_there(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs, timeout=2, on_timeout="run"))
    relay.start()

    send(relay, mr_series(tmp_path / "t2", "T2 tra", generate_uid(), 2))

    (task,) = submitted_tasks(emulator, 1)
    assert task["input_folders"] == {"t2": 2}
    assert "posted without adc (onTimeout: run)" in relay.log()
    pacs.wait_for_files(1)


def test_a_missing_series_with_on_timeout_fail_posts_nothing_and_keeps_the_instances(tmp_path, emulator, pacs,
                                                                                   relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs, timeout=2, on_timeout="fail"))
    relay.start()

    send(relay, mr_series(tmp_path / "t2", "T2 tra", generate_uid(), 2))

    relay.wait_for_log(r"series .* failed \(1 tasks, 1 failed\)")
    assert "no series for adc (onTimeout: fail)" in relay.log()
    assert emulator.stats()["submits"] == 0
    assert len(relay.stored_instances()) == 2  # a failed series keeps its instances
    (document,) = relay.state_documents()
    assert [task["phase"] for task in document["tasks"]] == ["Failed"]


def test_a_series_level_fingerprint_beside_a_study_level_one_runs_as_before(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs))
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs, modality="^CT$"))
    relay.start()
    ct = write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)

    send(relay, ct)

    (task,) = submitted_tasks(emulator, 1)
    (folder,) = task["input_folders"]
    assert folder.startswith(series_uid(ct) + "_") and task["input_folders"][folder] == 3
    pacs.wait_for_files(1)
    assert "waiting for the rest of its study" not in relay.log()


def test_a_relay_killed_while_a_study_waits_posts_it_whole_after_the_restart(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs))
    relay.start()
    study = generate_uid()
    t2 = mr_series(tmp_path / "t2", "T2 tra", study, 2)
    send_and_wait_for_its_share(relay, t2, 0)

    relay.restart()  # SIGKILL, then a new process
    adc = send(relay, mr_series(tmp_path / "adc", "ADC", study, 1))

    (task,) = submitted_tasks(emulator, 1)
    assert task["input_folders"] == {"t2": 2, "adc": 1}
    assert task["input_series"] == sorted([series_uid(t2), series_uid(adc)])
    pacs.wait_for_files(2)


def test_a_late_instance_reruns_its_series_as_the_studys_next_task_and_a_resent_one_runs_nothing(
        tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(prostate(emulator.base_url, pacs, timeout=2, on_timeout="run"))
    relay.start()
    study = generate_uid()
    t2 = mr_series(tmp_path / "t2", "T2 tra", study, 2)
    adc = mr_series(tmp_path / "adc", "ADC", study, 3)
    send(relay, t2 + adc[:2])
    submitted_tasks(emulator, 1)
    relay.wait_for_log(r"series .* succeeded", count=2)

    send(relay, adc[:1])  # sent again: a duplicate
    send(relay, adc[2:])  # new: the ADC series re-opens (LATE_INSTANCE_POLICY=reopen)

    first, second = sorted(submitted_tasks(emulator, 2), key=lambda task: len(task["input_folders"]), reverse=True)
    assert first["input_folders"] == {"t2": 2, "adc": 2}
    assert second["input_folders"] == {"adc": 3}  # all its instances; T2 did not come again in time
    assert "posted without t2 (onTimeout: run)" in relay.log()
