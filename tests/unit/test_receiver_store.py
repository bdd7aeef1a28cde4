"""Receiver.store(): validation and statuses, on the encoded bytes of a C-STORE dataset."""

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from relay.config import load_settings
from relay.dicom import receiver as rx
from relay.storage.base import StorageError, StorageFull
from relay.dicom.store import IncomingInstance
from relay.storage.local import LocalStorage, LocalUpload
from isdr_devtools.synthetic import write_ct_series

IMPLICIT = "1.2.840.10008.1.2"


class Sink:
    def __init__(self):
        self.instances = []

    def instance_stored(self, instance):
        self.instances.append(instance)

    def association_ended(self, calling):
        pass


def encoded(dataset):
    """The dataset alone, implicit VR little endian: what a C-STORE request carries."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, dataset)
    return buffer.getvalue()


@pytest.fixture
def setup(tmp_path):
    ds = pydicom.dcmread(write_ct_series(tmp_path / "ct", count=1, rows=8, cols=8)[0])
    sink = Sink()
    receiver = rx.Receiver(load_settings({}), LocalStorage(tmp_path / "data"), sink)
    return ds, receiver, sink, tmp_path / "data"


def store(receiver, ds, raw=None, **overrides):
    args = dict(raw=raw if raw is not None else encoded(ds), transfer_syntax=IMPLICIT,
                affected_sop_class_uid=str(ds.SOPClassUID),
                affected_sop_instance_uid=str(ds.SOPInstanceUID), calling_ae_title="CT1")
    args.update(overrides)
    return receiver.store(**args)


def test_stored_file_is_the_received_dataset_behind_a_file_meta_header(setup):
    ds, receiver, sink, root = setup
    raw = encoded(ds)
    assert store(receiver, ds, raw) == rx.SUCCESS
    (path,) = list(root.rglob("*.dcm"))
    assert path.relative_to(root).as_posix() == (
        f"series/{ds.SeriesInstanceUID}/{ds.SOPClassUID}/{ds.SOPInstanceUID}.dcm")
    assert path.read_bytes().endswith(raw)
    stored = pydicom.dcmread(path)
    assert stored.PixelData == ds.PixelData
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == IMPLICIT
    assert stored.file_meta.SourceApplicationEntityTitle == "CT1"
    assert sink.instances[0].identity.attributes.modality == "CT"


def test_a_resent_instance_does_not_duplicate(setup):
    ds, receiver, sink, root = setup
    assert store(receiver, ds) == store(receiver, ds) == rx.SUCCESS
    assert len(list(root.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("attribute", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
def test_malformed_uids_are_refused_without_storing(setup, attribute):
    ds, receiver, sink, root = setup
    setattr(ds, attribute, "1.2.3/../../etc")
    status = store(receiver, ds, affected_sop_instance_uid=str(ds.SOPInstanceUID))
    assert status == rx.INVALID_UID
    assert not list(root.rglob("*.dcm")) and not sink.instances


def test_padding_is_not_part_of_a_uid_or_the_modality(setup):
    """Odd-length values are padded to even length: UIDs with NUL, code strings with a space."""
    ds, receiver, sink, root = setup
    ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", "SEG"
    raw = encoded(ds)
    assert b"1.2.3.4\x00" in raw and b"SEG " in raw
    assert store(receiver, ds, raw) == rx.SUCCESS
    identity = sink.instances[-1].identity
    assert identity.series.series_uid == "1.2.3.4"
    assert identity.attributes.modality == "SEG"


def test_missing_series_uid_is_refused(setup):
    ds, receiver, sink, root = setup
    del ds.SeriesInstanceUID
    assert store(receiver, ds) == rx.INVALID_UID


def test_truncated_and_garbage_datasets_are_undecodable(setup):
    ds, receiver, sink, root = setup
    raw = encoded(ds)
    assert store(receiver, ds, raw[: len(raw) - 50]) == rx.UNDECODABLE
    assert store(receiver, ds, b"\xff" * 37) == rx.UNDECODABLE
    assert not list(root.rglob("*.dcm"))


def test_a_sequence_cut_before_its_delimiter_is_undecodable(setup):
    ds, receiver, sink, root = setup
    item = Dataset()
    item.CodeValue = "123"
    del ds.PixelData
    # An undefined-length sequence as the last element: truncation removes its delimiter.
    ds.add_new(0x00400260, "SQ", Sequence([item]))
    ds[0x00400260].is_undefined_length = True
    whole = encoded(ds)
    assert whole.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    assert store(receiver, ds, whole[:-8]) == rx.UNDECODABLE
    assert not list(root.rglob("*.dcm"))
    assert store(receiver, ds, whole) == rx.SUCCESS


def test_sop_class_and_instance_must_agree_with_the_request(setup):
    ds, receiver, sink, root = setup
    assert store(receiver, ds, affected_sop_class_uid="1.2.3") == rx.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert store(receiver, ds, affected_sop_instance_uid="1.2.3") == rx.INVALID_UID


@pytest.mark.parametrize("error, status", [(StorageFull("full"), rx.OUT_OF_RESOURCES),
                                           (StorageError("broken"), rx.PROCESSING_FAILURE)])
@pytest.mark.parametrize("when", ["opening", "committing"])
def test_storage_failures_are_failure_statuses_and_nothing_is_registered(setup, monkeypatch, error, status, when):
    ds, receiver, sink, root = setup

    def fail(*args):
        raise error

    if when == "opening":
        monkeypatch.setattr(receiver.storage, "open_upload", fail)
    else:
        monkeypatch.setattr(LocalUpload, "commit", fail)
    assert store(receiver, ds) == status
    assert not sink.instances
    assert not [p for p in root.rglob("*") if p.is_file()]  # no temporary file left behind


def test_a_dataset_fed_in_small_fragments_is_stored_as_one(setup):
    ds, receiver, sink, root = setup
    raw = encoded(ds)
    instance = IncomingInstance(receiver.storage, IMPLICIT, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "CT1")
    for start in range(0, len(raw), 7):  # every header cut somewhere
        instance.write(raw[start:start + 7])
    status, stored = instance.finish()
    assert status == rx.SUCCESS and stored.identity.attributes.modality == "CT"
    assert list(root.rglob("*.dcm"))[0].read_bytes().endswith(raw)


def test_a_durable_write_that_stalls_is_said_in_the_log(setup, monkeypatch, caplog):
    # The sender waits for its answer while the storage makes the instance durable; a storage that
    # stalls must show in the log, not look like a hung receiver.
    from relay.dicom import store as store_module

    ds, receiver, _, _ = setup
    ticks = iter([100.0, 112.5])
    monkeypatch.setattr(store_module, "_clock", lambda: next(ticks))
    with caplog.at_level("WARNING", logger="relay.receiver"):
        assert store(receiver, ds) == rx.SUCCESS
    (record,) = [r for r in caplog.records if "durable" in r.getMessage()]
    assert "12.5s" in record.getMessage() and "from CT1" in record.getMessage()
    assert str(ds.PatientName) not in record.getMessage()
