"""What real scanners send is accepted, as they send it (issue 10): every standard storage SOP class,
the sender's own transfer syntax, large instances without holding them in memory, a real-world
corpus from dcmtk's storescu, pynetdicom's storescu and GDCM's gdcmscu, and Orthanc as a sender.
Every test runs `isdr run` as a process."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid)
from pynetdicom import AE

from isdr_devtools.synthetic import write_ct_series, write_instance
from tests.support.dicom_peers import StoreSCP, echoscu, storescu
from tests.support.orthanc import Orthanc
from tests.support.processes import dcmtk_env, require_binary, require_dcmtk, wait_until
from tests.support.raw_dicom import memory_of

MiB = 1024 * 1024
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.999.1"  # not in the standard
KEEP_SERIES = {"POST_AFTER": "3600"}  # no fingerprint matches: keep what was stored until the test looked


def standard_storage_sop_classes() -> list[str]:
    """Every storage SOP class in the standard as pydicom's UID dictionary lists it."""
    return sorted(uid for uid, (name, kind, *_rest) in UID_dictionary.items()
                  if kind == "SOP Class" and "Storage" in name and "Storage Commitment" not in name)


def dataset_bytes(path_or_bytes) -> bytes:
    """The dataset of a DICOM file as encoded on disk, without preamble and file meta."""
    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    handle = io.BytesIO(data)
    read_preamble(handle, False)
    _read_file_meta_info(handle)
    return data[handle.tell():]


def stored_path(relay, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return relay.data_dir / "series" / ds.SeriesInstanceUID / ds.SOPClassUID / f"{ds.SOPInstanceUID}.dcm"


# --- SOP classes ------------------------------------------------------------------------------

def test_every_standard_storage_sop_class_is_accepted(relays):
    relay = relays(env=KEEP_SERIES).start()
    classes = standard_storage_sop_classes()
    refused = []
    for start in range(0, len(classes), 120):  # an association offers at most 128 contexts
        ae = AE(ae_title="MODALITY")
        for uid in classes[start:start + 120]:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
        refused += [uid for uid in classes[start:start + 120] if uid not in accepted]
    print(f"{len(classes)} standard storage SOP classes proposed, {len(refused)} refused")
    assert refused == []


@pytest.mark.parametrize("sop_class", [
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.39.1",  # Color Palette
])
def test_storage_classes_that_were_refused_are_stored_from_storescu(tmp_path, relays, dcmtk, sop_class):
    relay = relays(env=KEEP_SERIES).start()
    path = write_instance(tmp_path / "one.dcm", sop_class_uid=sop_class)

    # -R: propose the file's own SOP class (storescu's default list leaves these out).
    result = subprocess.run([require_dcmtk("storescu"), "-aet", "SCANNER", "-aec", relay.ae_title, "-R", "127.0.0.1",
                             str(relay.port), str(path)], env=dcmtk_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)

    assert result.returncode == 0, result.stdout
    stored = wait_until(lambda: stored_path(relay, path).exists() and stored_path(relay, path))
    assert dataset_bytes(stored) == dataset_bytes(path)


def test_a_private_sop_class_is_refused_by_default_and_the_refusal_is_logged(tmp_path, relays):
    relay = relays(env=KEEP_SERIES).start()
    ae = AE(ae_title="VENDORBOX")
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1", ImplicitVRLittleEndian)  # C-FIND: not a storage
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)  # CT, so one is accepted
    assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
    assert assoc.is_established
    results = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assoc.release()

    assert set(results) == {PRIVATE_SOP_CLASS, "1.2.840.10008.5.1.4.1.2.2.1"}
    assert set(results.values()) == {0x03}  # abstract syntax not supported
    relay.wait_for_log(rf"WARNING .*VENDORBOX at 127\.0\.0\.1.*{PRIVATE_SOP_CLASS}.*SCP_ACCEPT_UNKNOWN_SOP_CLASSES")
    relay.wait_for_log(r"WARNING .*VENDORBOX at 127\.0\.0\.1.*1\.2\.840\.10008\.5\.1\.4\.1\.2\.2\.1.*not a storage")


def test_a_private_sop_class_is_stored_when_the_administrator_allows_it(tmp_path, relays):
    relay = relays(env={**KEEP_SERIES, "SCP_ACCEPT_UNKNOWN_SOP_CLASSES": "true"}).start()
    path = write_instance(tmp_path / "private.dcm", sop_class_uid=PRIVATE_SOP_CLASS)
    ae = AE(ae_title="VENDORBOX")
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()

    assert status.Status == 0x0000
    assert dataset_bytes(stored_path(relay, path)) == dataset_bytes(path)


def test_a_rejected_association_is_logged_with_the_calling_ae_the_address_and_the_reason(relays, dcmtk):
    relay = relays(env=KEEP_SERIES).start()

    result = echoscu(relay.port, called_ae="SOMEONEELSE", calling_ae="LOSTSCANNER")

    assert result.returncode != 0
    relay.wait_for_log(r"WARNING .*rejected association from LOSTSCANNER at 127\.0\.0\.1.*called AE title")


def test_an_association_aborted_by_the_sender_is_logged(tmp_path, relays):
    relay = relays(env=KEEP_SERIES).start()
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
    assert assoc.is_established
    assoc.abort()
    relay.wait_for_log(r"WARNING .*association from ABORTER at 127\.0\.0\.1 aborted by the peer")


# --- transfer syntaxes ------------------------------------------------------------------------

@pytest.mark.parametrize("proposed", [
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    [ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    [DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian],
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
])
def test_the_first_transfer_syntax_the_sender_proposes_is_the_one_accepted(relays, proposed):
    relay = relays(env=KEEP_SERIES).start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", proposed)  # Secondary Capture
    assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    assoc.release()
    assert context.transfer_syntax[0] == proposed[0]


# --- memory -----------------------------------------------------------------------------------

def write_large_instance(path: Path, frames: int = 300, rows: int = 512, cols: int = 512) -> Path:
    """A multi-frame CT of about 150 MiB (uncompressed 16-bit frames)."""
    ds = pydicom.dcmread(write_ct_series(path.parent / "template", count=1, rows=16, cols=16)[0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    frame = bytes(range(256)) * (rows * cols * 2 // 256)
    ds.PixelData = frame * frames
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_150_mb_instance_adds_well_under_its_size_to_peak_memory(tmp_path, relays, dcmtk):
    relay = relays(env=KEEP_SERIES).start()
    path = write_large_instance(tmp_path / "big.dcm")
    size = path.stat().st_size
    assert echoscu(relay.port).returncode == 0  # the receiving path has run once before measuring
    before = memory_of(relay.process.pid)

    result = storescu(relay.port, [path])

    assert result.returncode == 0, result.stdout
    after = memory_of(relay.process.pid)
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"{size / MiB:.0f} MiB instance: peak RSS {before['VmHWM'] / MiB:.0f} -> {after['VmHWM'] / MiB:.0f} MiB"
          f" (+{growth / MiB:.1f} MiB)")
    stored = stored_path(relay, path)
    assert hashlib.sha256(dataset_bytes(stored)).digest() == hashlib.sha256(dataset_bytes(path)).digest()
    assert growth < size / 4


# --- a real-world corpus ----------------------------------------------------------------------

# pydicom's own test files, each with the storescu option that proposes its transfer syntax.
CORPUS = {
    "CT_small.dcm": "-xe",  # explicit VR little endian
    "MR_small_implicit.dcm": "-xi",
    "MR_small_bigendian.dcm": "-xb",
    "rtdose_expb.dcm": "-xb",  # big endian, multi-frame RT Dose
    "image_dfl.dcm": "-xd",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG baseline
    "JPGExtended.dcm": "-xx",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm": "-xs",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm": "-xv",  # JPEG 2000 lossless
    "JPEG2000.dcm": "-xw",  # JPEG 2000
    "MR_small_RLE.dcm": "-xr",  # RLE
    "SC_rgb_rle_16bit_2frame.dcm": "-xr",  # RLE, multi-frame
    "examples_ybr_color.dcm": "-xy",  # JPEG baseline, multi-frame ultrasound
    "rtdose.dcm": "-xi",  # RT Dose, multi-frame
    "rtplan.dcm": "-xi",  # RT Plan
    "test-SR.dcm": "-xe",  # Comprehensive SR
    "reportsi.dcm": "-xe",  # Basic Text SR
    "liver_1frame.dcm": "-xe",  # SEG
    "waveform_ecg.dcm": "-xe",  # 12-lead ECG
}


def rtstruct_file(tmp_path: Path) -> Path:
    """pydicom's rtstruct.dcm is a bare dataset; give it the file meta storescu needs."""
    ds = pydicom.dcmread(PYDICOM_FILES / "rtstruct.dcm", force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def with_series(tmp_path: Path, name: str) -> Path:
    """pydicom's JPEG-LS near-lossless files lack the study and series UIDs every instance has."""
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)  # the encapsulated pixel data is written as it was read
    return path


def send_with_storescu(port: int, path: Path, option: str) -> subprocess.CompletedProcess:
    # -R: propose the file's own SOP class, with the transfer syntaxes `option` names.
    return subprocess.run([require_dcmtk("storescu"), "-aet", "CORPUS", "-aec", "ISDR", "-R", option, "127.0.0.1",
                           str(port), str(path)], env=dcmtk_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)


def test_pydicoms_real_world_files_are_stored_byte_identical_in_their_own_transfer_syntax(tmp_path, relays, dcmtk):
    """Each file goes to the relay and to dcmtk's storescp in bit-preserving mode (+B), preferring
    the same syntax: both must hold the same dataset bytes (storescu re-encodes some things on
    the way, such as sequence lengths and trailing padding, so the file itself is no oracle), in
    the file's own transfer syntax, in the file's own series folder."""
    relay = relays(env=KEEP_SERIES).start()
    files = {PYDICOM_FILES / name: option for name, option in CORPUS.items()}
    files[rtstruct_file(tmp_path)] = "-xi"
    files[with_series(tmp_path, "JPEGLSNearLossless_16.dcm")] = "-xu"  # JPEG-LS near-lossless
    failures = []
    for option in sorted(set(files.values())):
        oracle = StoreSCP(tmp_path / f"storescp{option}", ae_title="ISDR", options=["+B", "-pm", "+" + option[1:]])
        oracle.start()
        try:
            for path in [p for p, o in files.items() if o == option]:
                original = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                results = [send_with_storescu(port, path, option) for port in (relay.port, oracle.port)]
                stored = stored_path(relay, path)
                if any(result.returncode != 0 for result in results):
                    failures.append(f"{path.name}: storescu failed: {[r.stdout[-300:] for r in results]}")
                    continue
                if not stored.exists():
                    failures.append(f"{path.name}: not stored at {stored.relative_to(relay.data_dir)}")
                    continue
                (reference,) = [f for f in oracle.files()
                                if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == original.SOPInstanceUID]
                if dataset_bytes(stored) != dataset_bytes(reference):
                    failures.append(f"{path.name}: stored bytes differ from what storescp received")
                if pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID != \
                        original.file_meta.TransferSyntaxUID:
                    failures.append(f"{path.name}: stored under another transfer syntax")
        finally:
            oracle.stop()
    assert failures == [], "\n".join(failures)
    # Several of pydicom's files are one instance in several syntaxes: the last one sent replaced them.
    assert len(relay.stored_instances()) == len({stored_path(relay, path) for path in files})


def test_pynetdicoms_storescu_sends_each_file_in_its_own_syntax_and_it_is_stored_as_the_file_holds_it(relays):
    """pynetdicom's storescu app with --required-contexts proposes each file's own transfer syntax
    only, and sends the dataset as pydicom re-encodes it: identical to the file's, except for the
    deflated one (pydicom deflates anew), which must still decode to the same elements."""
    relay = relays(env=KEEP_SERIES).start()
    failures = []
    for name in CORPUS:
        path = PYDICOM_FILES / name
        result = subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(relay.port),
                                 str(path), "-aet", "PYNETDICOM", "-aec", "ISDR", "--required-contexts"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        stored, original = stored_path(relay, path), pydicom.dcmread(path)
        if not stored.exists():
            failures.append(f"{name}: not stored: {result.stdout[-300:]}")
            continue
        received = pydicom.dcmread(stored)
        if received.file_meta.TransferSyntaxUID != original.file_meta.TransferSyntaxUID:
            failures.append(f"{name}: stored under {received.file_meta.TransferSyntaxUID}")
        elif original.file_meta.TransferSyntaxUID.is_deflated:
            if received != original:
                failures.append(f"{name}: the deflated dataset decodes to other elements")
        elif dataset_bytes(stored) != dataset_bytes(path):
            failures.append(f"{name}: stored bytes differ from the file's")
    assert failures == [], "\n".join(failures)


# --- GDCM's gdcmscu as a sender ---------------------------------------------------------------

def gdcmscu(port: int, *args: str, called_ae: str = "ISDR") -> str:
    """Runs GDCM's gdcmscu with its debug log and returns that log.

    Quirk of gdcmscu 3.0.21 (Debian 12's libgdcm-tools): it aborts ("ProtocolStream as nullptr is
    invalid", exit status 134) right after the A-RELEASE-RP of every association it releases,
    against any SCP (dcmtk's storescp too), and also after a rejection: its exit status says
    nothing, so the tests read the association result and the response statuses in its log."""
    return subprocess.run([require_binary("gdcmscu"), "-D", "--aetitle", "GDCM", "--call", called_ae, *args,
                           "127.0.0.1", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", timeout=60).stdout


def response_statuses(log: str) -> set[int]:
    """The Status (0000,0900) of the responses gdcmscu received (it prints each more than once)."""
    return {int(value) for value in re.findall(r"^\(0000,0900\) \S+ \(US\) (\d+)", log, re.MULTILINE)}


def test_gdcmscu_echo_is_answered_and_a_wrong_called_ae_title_is_rejected(relays):
    relay = relays(env=KEEP_SERIES).start()
    assert response_statuses(gdcmscu(relay.port, "--echo")) == {0x0000}
    refused = gdcmscu(relay.port, "--echo", called_ae="SOMEONE")
    assert "rejected-permanent" in refused and "called-AE-title-not-recognized" in refused
    assert response_statuses(refused) == set()


GDCM_CORPUS = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
               "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "test-SR.dcm",
               "waveform_ecg.dcm"]
GDCM_ODD_LENGTH = {"image_dfl.dcm"}


def test_gdcmscu_sends_real_world_files_in_their_own_syntax_and_they_are_stored_byte_identical(tmp_path, relays,
                                                                                              dcmtk):
    """gdcmscu proposes each file's own transfer syntax. Each file goes to the relay and to dcmtk's
    storescp in bit-preserving mode (+B): both must hold the same dataset bytes (GDCM re-encodes
    some files on the way, JPEG 2000 here, so the file itself is no oracle). Several of pydicom's
    files are one instance in several syntaxes: each is checked right after it was sent.

    Quirk: gdcmscu sends the deflated file's dataset as the file holds it, 4303 bytes, an odd PDV
    length that storescp aborts ("DIMSE: Odd Fragment Length"); the relay stores it as sent, so
    there the file is the oracle."""
    relay = relays(env=KEEP_SERIES).start()
    failures = []
    for name in GDCM_CORPUS:
        path, option = PYDICOM_FILES / name, CORPUS[name]  # storescp accepts the syntax storescu's option names
        oracle = StoreSCP(tmp_path / f"storescp-{name}", ae_title="ISDR", options=["+B", "+" + option[1:]]).start()
        try:
            log = gdcmscu(relay.port, "--store", "-i", str(path))
            gdcmscu(oracle.port, "--store", "-i", str(path))
        finally:
            oracle.stop()
        stored, received = stored_path(relay, path), oracle.files()
        if name in GDCM_ODD_LENGTH:
            if received:
                failures.append(f"{name}: storescp takes it now: compare with what it received")
                continue
            received = [path]
        if response_statuses(log) != {0x0000}:
            failures.append(f"{name}: C-STORE answered {response_statuses(log)}: {log[-300:]}")
        elif not stored.exists():
            failures.append(f"{name}: not stored at {stored.relative_to(relay.data_dir)}")
        elif len(received) != 1:
            failures.append(f"{name}: storescp received {len(received)} files")
        elif pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID != \
                pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID:
            failures.append(f"{name}: stored under another transfer syntax")
        elif dataset_bytes(stored) != dataset_bytes(received[0]):
            failures.append(f"{name}: stored bytes differ from what storescp received")
    assert failures == [], "\n".join(failures)


# --- Orthanc as a sender ----------------------------------------------------------------------

@pytest.fixture
def orthanc_sender(tmp_path, relays):
    relay = relays(env=KEEP_SERIES).start()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"relay": ("ISDR", "127.0.0.1", relay.port)}).start()
    yield orthanc, relay
    orthanc.stop()


def test_orthanc_sends_a_series_and_the_relay_stores_it_as_orthanc_holds_it(tmp_path, orthanc_sender):
    orthanc, relay = orthanc_sender
    series = write_ct_series(tmp_path / "ct", count=4, rows=64, cols=64)
    jpeg = PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm"
    ids = {path: orthanc.upload(path) for path in [*series, jpeg]}

    answer = orthanc.store_to("relay", list(ids.values()))

    assert answer.get("FailedInstancesCount", 0) == 0, answer
    for path, instance_id in ids.items():
        stored = stored_path(relay, path)
        assert stored.exists(), path.name
        assert dataset_bytes(stored) == dataset_bytes(orthanc.file(instance_id)), path.name
    assert "ORTHANC" in pydicom.dcmread(stored_path(relay, series[0]), stop_before_pixels=True) \
        .file_meta.SourceApplicationEntityTitle
