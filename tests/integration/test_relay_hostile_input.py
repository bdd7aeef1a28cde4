"""Hostile input from the network: the relay answers with a proper failure and keeps running."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from isdr_devtools.synthetic import write_ct_series, write_instance
from tests.integration.test_relay_end_to_end import send, wait_until
from tests.support.fingerprints import manifest
from tests.support.dicom_peers import storescu


def files_outside(root: Path, names: set[str]) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in names]


def test_patient_id_with_path_segments_never_reaches_a_path_or_the_log(tmp_path, relays, dcmtk):
    relay = relays().start()
    files = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16,
                            patient_id="../../x", patient_name="Doe^Jane")

    send(relay, files)

    stored = wait_until(lambda: len(relay.stored_instances()) == 2 and relay.stored_instances())
    for path in stored:
        assert path.resolve().is_relative_to(relay.data_dir.resolve())
        assert "x" not in path.relative_to(relay.data_dir).parts
    assert not (tmp_path / "x").exists() and not (relay.workdir / "x").exists()
    log = relay.log()
    assert "../../x" not in log and "Doe" not in log


def test_uid_with_a_slash_is_refused_with_a_failure_status(tmp_path, relays, dcmtk):
    relay = relays().start()
    bad = write_instance(tmp_path / "bad.dcm", SeriesInstanceUID="1.2.3/../../4")

    result = storescu(relay.port, [bad])

    assert "0xc220" in result.stdout.lower() or result.returncode != 0
    relay.wait_for_log(r"SeriesInstanceUID is not a valid UID")
    assert relay.stored_instances() == [] and relay.alive()


def test_truncated_dataset_is_refused_and_the_relay_keeps_receiving(tmp_path, relays, dcmtk, monkeypatch):
    relay = relays().start()
    good = write_ct_series(tmp_path / "ct", count=2, rows=64, cols=64)
    truncated = tmp_path / "truncated.dcm"
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) - 3000])  # cut into the pixel data
    ds = pydicom.dcmread(good[0], stop_before_pixels=True)

    # In chunked mode pynetdicom sends a file's dataset bytes as they are on disk (by default it
    # decodes and re-encodes, which would mend the cut), so the relay gets the truncated bytes.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", relay.port, ae_title="ISDR")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(truncated)
    finally:
        assoc.release()

    assert status.Status == 0xC210
    relay.wait_for_log(r"dataset cannot be decoded")
    send(relay, good[1:])  # a good instance afterwards is still stored
    assert len(relay.stored_instances()) == 1 and relay.alive()


@pytest.mark.parametrize("model", ["evil-dotdot", "evil-symlink"])
def test_output_archive_entries_that_escape_are_not_written(tmp_path, emulator, pacs, relays, model):
    relay = relays()
    relay.add_manifest(manifest("evil", emulator.base_url, model, pacs))
    relay.start()

    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))

    pacs.wait_for_files(1)  # the legitimate RTSTRUCT in the same archive is delivered
    assert not files_outside(tmp_path, {"escaped.dcm"})
    assert not Path("/tmp/isdr-absolute-escape.dcm").exists()
    assert relay.alive()


def test_output_archive_over_the_size_limit_fails_the_task(tmp_path, emulator, pacs, relays):
    relay = relays(env={"MAX_OUTPUT_BYTES": str(8 * 1024 * 1024)})
    relay.add_manifest(manifest("bomb", emulator.base_url, "evil-bomb", pacs))
    relay.start()

    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))

    relay.wait_for_log(r"task failed: .*(limit|size|large)")
    assert pacs.files() == [] and relay.alive()
