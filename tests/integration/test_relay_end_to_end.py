"""`isdr run` end to end: dcmtk storescu -> relay -> InferenceServer emulator -> dcmtk storescp.

Every peer is a real process. The emulator counts submits, which is how "exactly once" is checked
after the relay is killed at awkward moments.
"""

from __future__ import annotations

import time

import pydicom

from isdr_devtools.synthetic import write_ct_series
from tests.support.processes import wait_until
from tests.support.dicom_peers import echoscu, storescu
from tests.support.fingerprints import manifest

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def seed(url, model, pacs, **match):
    """A fingerprint in the original relay's JSON format (protocol v1)."""
    return {
        "modality_regex": match.get("modality", ""),
        "sop_class_uid_regex": "",
        "series_description_regex": match.get("series_description", ""),
        "study_description_regex": "",
        "exclude_regex": match.get("exclude", "a^"),
        "inference_server_url": url,
        "model_human_readable_id": model,
        "scus": [{"scu_ip": "127.0.0.1", "scu_port": str(pacs.port), "scu_ae_title": pacs.ae_title}],
    }


def send(relay, files, **kwargs):
    result = storescu(relay.port, files, called_ae=relay.ae_title, **kwargs)
    assert result.returncode == 0, result.stdout
    return result


def assert_rtstruct_for(pacs_files, series_files):
    source = pydicom.dcmread(series_files[0], stop_before_pixels=True)
    outputs = [pydicom.dcmread(p) for p in pacs_files]
    assert all(ds.SOPClassUID == RTSTRUCT for ds in outputs)
    for ds in outputs:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


def test_v1_seed_fingerprint_over_tls_end_to_end(tmp_path, tls_emulator, pacs, relays):
    relay = relays(env={"CERT_FILE": str(tls_emulator.ca_file)})
    relay.add_seed_fingerprint("ct", seed(tls_emulator.v1_tasks_url, "toy", pacs, modality="CT"))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=5, rows=64, cols=64)

    send(relay, series)

    received = pacs.wait_for_files(1)
    assert_rtstruct_for(received, series)
    stats = wait_until(lambda: (s := tls_emulator.stats())["deletes"] == 1 and s, what="delete")
    assert stats["submits"] == 1
    assert stats["tasks"][0]["protocol"] == "v1" and stats["tasks"][0]["input_files"] == 5
    # DELETE_ON_POST (default true): the series' instances are gone once delivered.
    wait_until(lambda: not relay.stored_instances(), what="instances deleted")
    assert relay.alive()


def test_v2_manifest_over_tls_with_ca_from_the_fingerprint(tmp_path, tls_emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct-v2", tls_emulator.base_url, "toy", pacs, ca_path=tls_emulator.ca_file))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=4, rows=32, cols=32)

    send(relay, series)

    assert_rtstruct_for(pacs.wait_for_files(1), series)
    stats = wait_until(lambda: (s := tls_emulator.stats())["deletes"] == 1 and s, what="delete")
    assert stats["submits"] == 1 and stats["tasks"][0]["protocol"] == "v2"


def test_series_over_several_associations_is_one_submit(tmp_path, emulator, pacs, relays):
    relay = relays(env={"POST_AFTER": "2"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=9, rows=32, cols=32)

    for part in (series[:3], series[3:6], series[6:]):
        send(relay, part)

    pacs.wait_for_files(1)
    stats = wait_until(lambda: (s := emulator.stats())["deletes"] == 1 and s, what="delete")
    assert stats["submits"] == 1 and stats["tasks"][0]["input_files"] == 9


def test_two_fingerprints_matching_one_series_run_two_tasks(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("organs", emulator.base_url, "toy", pacs))
    relay.add_seed_fingerprint("legacy", seed(emulator.v1_tasks_url, "toy-v1", pacs, modality="CT"))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)

    send(relay, series)

    assert len(pacs.wait_for_files(2)) == 2
    stats = wait_until(lambda: (s := emulator.stats())["deletes"] == 2 and s, what="deletes")
    assert stats["submits_by_model"] == {"toy": 1, "toy-v1": 1}


def test_series_matching_no_fingerprint_is_deleted_without_a_submit(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("mr-only", emulator.base_url, "toy", pacs, modality="^MR$"))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)

    send(relay, series)

    relay.wait_for_log(r"matches no fingerprint")
    wait_until(lambda: not relay.stored_instances(), what="unmatched instances deleted")
    assert emulator.stats()["submits"] == 0 and pacs.files() == []


def test_failing_model_fails_the_task_with_the_servers_message_and_keeps_the_data(
        tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("broken", emulator.base_url, "fail", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=32, cols=32)

    send(relay, series)

    log = relay.wait_for_log(r"task failed")
    assert "552" in log or "crashed" in log
    relay.wait_for_log(r"series \S+ failed")
    assert len(relay.stored_instances()) == 2  # kept for a re-send or an investigation
    assert relay.alive() and pacs.files() == []


def test_inference_server_down_then_back(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    emulator.kill()
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=32, cols=32)

    send(relay, series)
    relay.wait_for_log(r"InferenceServer unavailable, retrying")
    emulator.restart()

    pacs.wait_for_files(1, timeout=90)
    assert emulator.stats()["submits"] == 1


def test_destination_down_then_back(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    pacs.stop()
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=32, cols=32)

    send(relay, series)
    relay.wait_for_log(r"did not accept an association|rejected the association")
    pacs.start()

    pacs.wait_for_files(1, timeout=90)
    assert emulator.stats()["submits"] == 1


def test_an_implicit_vr_only_destination_gets_the_predictions_converted(tmp_path, emulator, relays, dcmtk):
    from tests.support.dicom_peers import StoreSCP

    # This PACS accepts implicit VR little endian only; the model's RTSTRUCT is explicit VR.
    picky = StoreSCP(tmp_path / "picky", ae_title="PICKY", options=["+xi"]).start()
    try:
        relay = relays()
        relay.add_manifest(manifest("ct", emulator.base_url, "toy", picky))
        relay.start()
        series = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
        send(relay, series)

        received = picky.wait_for_files(1)
        assert_rtstruct_for(received, series)
        assert pydicom.dcmread(received[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        relay.wait_for_log(r"converted prediction \S+ from Explicit VR Little Endian to Implicit VR Little Endian "
                           r"for PICKY@127\.0\.0\.1:\d+")
        relay.wait_for_log(r"task succeeded")
    finally:
        picky.stop()


def test_predictions_reach_orthanc_as_a_destination(tmp_path, emulator, relays, orthancs, dcmtk):
    orthanc = orthancs("ORTHANC")
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", orthanc))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)

    send(relay, series)

    (instance,) = orthanc.wait_for_instances(1)
    tags = orthanc.tags(instance)
    source = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert tags["SOPClassUID"] == RTSTRUCT and tags["StudyInstanceUID"] == source.StudyInstanceUID
    assert orthanc.metadata(instance)["RemoteAET"] == relay.ae_title
    relay.wait_for_log(r"task succeeded")


def test_a_destination_refusing_every_syntax_fails_the_task_and_says_so_at_error(tmp_path, emulator, relays,
                                                                                 orthancs, dcmtk):
    jpeg_only = orthancs("JPEGONLY", accepted_transfer_syntaxes=["1.2.840.10008.1.2.4.50"])
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", jpeg_only))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))

    log = relay.wait_for_log(r"ERROR +relay.pipeline: delivery failed for good: JPEGONLY@127\.0\.0\.1:\d+ "
                             r"refused 1 of 1 predictions")
    assert "accepted no presentation context for 1.2.840.10008.5.1.4.1.1.481.3 in Explicit VR Little Endian, " \
           "Implicit VR Little Endian" in log
    relay.wait_for_log(r"task failed: JPEGONLY")
    assert jpeg_only.instance_ids() == [] and relay.alive()


def test_killed_during_receive_keeps_every_acknowledged_instance(tmp_path, emulator, pacs, relays):
    relay = relays(env={"POST_AFTER": "3"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=8, rows=32, cols=32)

    send(relay, series[:5])
    relay.kill()  # before POST_AFTER: nothing dispatched yet, 5 instances acknowledged
    assert len(relay.stored_instances()) == 5
    relay.start()
    send(relay, series[5:])

    pacs.wait_for_files(1, timeout=60)
    stats = wait_until(lambda: (s := emulator.stats())["deletes"] == 1 and s, what="delete")
    assert stats["submits"] == 1 and stats["tasks"][0]["input_files"] == 8


def test_killed_during_polling_resumes_without_a_second_submit(tmp_path, pacs, relays):
    from tests.support.emulator import EmulatorProcess

    slow = EmulatorProcess(tmp_path / "slow-emulator", tls=False, delay=4.0)
    try:
        relay = relays()
        relay.add_manifest(manifest("ct", slow.base_url, "toy", pacs))
        relay.start()
        send(relay, write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32))
        relay.wait_for_log(r"submitted 3 instances")
        relay.kill()

        relay.start()
        relay.wait_for_log(r"resuming: task")
        pacs.wait_for_files(1, timeout=60)
        assert slow.stats()["submits"] == 1
    finally:
        slow.stop()


def test_killed_during_delivery_resumes_without_a_second_submit(tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    pacs.stop()
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=32, cols=32))
    relay.wait_for_log(r"received 1 predictions")  # now delivering, destination down
    relay.kill()

    pacs.start()
    relay.start()
    pacs.wait_for_files(1, timeout=60)
    stats = wait_until(lambda: (s := emulator.stats())["deletes"] == 1 and s, what="delete")
    assert stats["submits"] == 1
    time.sleep(1)
    assert len(pacs.files()) == 1  # not delivered twice


def test_echo_and_called_ae_title_check(relays, dcmtk):
    relay = relays().start()
    assert echoscu(relay.port, called_ae="ISDR").returncode == 0
    wrong = echoscu(relay.port, called_ae="SOMEONE_ELSE")
    assert wrong.returncode != 0
    assert relay.alive()


def test_calling_ae_allow_list(tmp_path, relays, dcmtk):
    relay = relays(env={"SCP_ALLOWED_AE_TITLES": "CT_SCANNER,MR_SCANNER"}).start()
    assert echoscu(relay.port, calling_ae="CT_SCANNER").returncode == 0
    refused = storescu(relay.port, write_ct_series(tmp_path / "ct", count=1, rows=16, cols=16),
                       calling_ae="INTRUDER")
    assert refused.returncode != 0
    assert relay.stored_instances() == []
    assert "calling AE title not allowed" in relay.log()
