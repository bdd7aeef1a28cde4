"""Delivery (relay.dicom.sender) against real destinations: dcmtk's storescp and Orthanc.

A prediction goes in its own transfer syntax where the destination accepts it, converted where it
does not (issue 10), and over TLS where the destination says so (issue 11). The files are
pydicom's own test files, written by real software in each syntax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from relay.dicom.sender import DestinationUnavailable, read_outgoing, send_files
from relay.fingerprints.model import Destination, DestinationTLS
from tests.support.certificates import CertificateAuthority

IMPLICIT_ONLY = ["+xi"]  # storescp: accept implicit VR little endian only

# file -> (its transfer syntax, what the implicit-VR-only destination gets)
CORPUS = {
    "CT_small.dcm": "Explicit VR Little Endian",
    "MR_small_bigendian.dcm": "Explicit VR Big Endian",
    "image_dfl.dcm": "Deflated Explicit VR Little Endian",
    "MR_small_RLE.dcm": "RLE Lossless",
    "MR_small_jp2klossless.dcm": "JPEG 2000 Image Compression (Lossless Only)",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS Lossless Image Compression",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG Baseline (Process 1)",
    "MR_small_implicit.dcm": "Implicit VR Little Endian",
}


def outgoing(tmp_path: Path, names) -> list:
    """Copies of pydicom's files, each with a SOP Instance UID of its own (several of them are
    the same MR slice in different syntaxes, with the same UID)."""
    folder = tmp_path / "outputs"
    folder.mkdir(exist_ok=True)
    paths = []
    for name in names:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return read_outgoing(paths)


def destination(scp, tls: DestinationTLS | None = None) -> Destination:
    return Destination("127.0.0.1", scp.port, scp.ae_title, tls=tls)


def test_every_prediction_reaches_an_implicit_vr_only_destination_converted(tmp_path, storescps):
    picky = storescps("PICKY", options=IMPLICIT_ONLY)
    files = outgoing(tmp_path, CORPUS)
    assert {pydicom.uid.UID(f.transfer_syntax).name for f in files} == set(CORPUS.values())

    result = send_files(destination(picky), files, "ISDR")

    assert result.refused == {}
    assert sorted(result.accepted) == sorted(f.sop_instance_uid for f in files)
    received = {ds.SOPInstanceUID: ds for ds in picky.datasets()}
    for item in files:
        ds = received[item.sop_instance_uid]
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        original = pydicom.dcmread(item.path)
        if "PixelData" in original:
            assert np.array_equal(ds.pixel_array, original.pixel_array), item.path.name


def test_a_destination_that_accepts_the_files_own_syntax_gets_it_unchanged(tmp_path, storescps):
    pacs = storescps("PACS")
    files = outgoing(tmp_path, ["MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "CT_small.dcm"])

    result = send_files(destination(pacs), files, "ISDR")

    assert result.refused == {} and len(result.accepted) == 3
    for ds in pacs.datasets():
        item = next(f for f in files if f.sop_instance_uid == ds.SOPInstanceUID)
        assert ds.file_meta.TransferSyntaxUID == item.transfer_syntax
        assert ds.PixelData == pydicom.dcmread(item.path).PixelData  # byte for byte


def test_a_decoded_prediction_larger_than_the_bound_is_refused_not_decoded(tmp_path, storescps):
    picky = storescps("PICKY", options=IMPLICIT_ONLY)
    files = outgoing(tmp_path, ["MR_small_RLE.dcm", "CT_small.dcm"])

    result = send_files(destination(picky), files, "ISDR", max_decoded_bytes=1024)

    (rle,) = [f for f in files if f.path.name == "MR_small_RLE.dcm"]
    status, meaning = result.refused[rle.sop_instance_uid]
    assert "cannot convert it from RLE Lossless to Implicit VR Little Endian" in meaning
    assert "more than the 1024 allowed" in meaning
    assert rle.sop_instance_uid not in result.transient_refusals  # lasting: not retried
    assert len(result.accepted) == 1  # the uncompressed one is converted and sent


# --- Orthanc ----------------------------------------------------------------------------------


def test_orthanc_receives_predictions_in_their_own_syntax(tmp_path, orthancs):
    orthanc = orthancs()
    files = outgoing(tmp_path, ["MR_small_implicit.dcm", "MR_small_jp2klossless.dcm"])

    result = send_files(destination(orthanc), files, "ISDR")

    assert result.refused == {}
    for item in files:
        instance = orthanc.wait_for_instance(item.sop_instance_uid)
        metadata = orthanc.metadata(instance)
        assert metadata["TransferSyntax"] == item.transfer_syntax and metadata["RemoteAET"] == "ISDR"


def test_orthanc_limited_to_implicit_vr_receives_converted_predictions(tmp_path, orthancs):
    orthanc = orthancs("STRICT", accepted_transfer_syntaxes=[ImplicitVRLittleEndian])
    files = outgoing(tmp_path, ["CT_small.dcm", "MR_small_jp2klossless.dcm"])

    result = send_files(destination(orthanc), files, "ISDR")

    assert result.refused == {}
    for item in files:
        instance = orthanc.wait_for_instance(item.sop_instance_uid)
        assert orthanc.metadata(instance)["TransferSyntax"] == ImplicitVRLittleEndian


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """The destination's CA and certificate, a stranger CA, and a CA for the relay's client certificate."""
    pacs_ca = CertificateAuthority(tmp_path / "pacs-ca", "PACS CA")
    return {
        "pacs_ca": pacs_ca,
        "pacs": pacs_ca.issue("pacs", server=True),
        "stranger_ca": CertificateAuthority(tmp_path / "stranger-ca", "Someone else's CA"),
        "client_ca": (client_ca := CertificateAuthority(tmp_path / "client-ca", "ISDR client CA")),
        "client": client_ca.issue("isdr", client=True),
    }


def tls_scp(storescps, pki, **kwargs):
    return storescps("SECURE", tls=(pki["pacs"].certificate, pki["pacs"].key), **kwargs)


def test_a_tls_destination_verified_against_its_ca_receives_the_predictions(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki)
    files = outgoing(tmp_path, ["CT_small.dcm"])

    result = send_files(destination(secure, DestinationTLS(ca_bundle=str(pki["pacs_ca"].certificate))), files, "ISDR")

    assert result.accepted == [files[0].sop_instance_uid]
    assert [ds.SOPInstanceUID for ds in secure.datasets()] == [files[0].sop_instance_uid]


def test_a_tls_destination_whose_certificate_does_not_verify_is_unavailable_with_the_reason(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki)
    files = outgoing(tmp_path, ["CT_small.dcm"])
    wrong_ca = str(pki["stranger_ca"].certificate)

    with pytest.raises(DestinationUnavailable) as refused:
        send_files(destination(secure, DestinationTLS(ca_bundle=wrong_ca)), files, "ISDR")

    assert str(refused.value) == (
        f"SECURE@127.0.0.1:{secure.port}: TLS handshake failed: the destination's certificate does not "
        f"verify against {wrong_ca}: unable to get local issuer certificate")
    assert secure.files() == []


def test_a_tls_destination_is_verified_against_the_name_it_is_reached_by(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki)
    files = outgoing(tmp_path, ["CT_small.dcm"])
    tls = DestinationTLS(ca_bundle=str(pki["pacs_ca"].certificate), server_name="pacs.example.org")

    with pytest.raises(DestinationUnavailable, match="Hostname mismatch|IP address mismatch|doesn't match"):
        send_files(destination(secure, tls), files, "ISDR")


def test_a_destination_that_requires_a_client_certificate_gets_ours(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki, client_cas=[pki["client_ca"].certificate])
    files = outgoing(tmp_path, ["CT_small.dcm"])
    ca = str(pki["pacs_ca"].certificate)

    with pytest.raises(DestinationUnavailable, match="TLS"):
        send_files(destination(secure, DestinationTLS(ca_bundle=ca)), files, "ISDR")
    assert secure.files() == []

    mutual = DestinationTLS(ca_bundle=ca, client_certificate=str(pki["client"].certificate),
                            client_key=str(pki["client"].key))
    result = send_files(destination(secure, mutual), files, "ISDR")
    assert result.accepted == [files[0].sop_instance_uid] and len(secure.files()) == 1


def test_a_client_certificate_from_a_ca_the_destination_does_not_trust_is_refused(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki, client_cas=[pki["client_ca"].certificate])
    files = outgoing(tmp_path, ["CT_small.dcm"])
    impostor = pki["stranger_ca"].issue("impostor", client=True)
    tls = DestinationTLS(ca_bundle=str(pki["pacs_ca"].certificate), client_certificate=str(impostor.certificate),
                         client_key=str(impostor.key))

    with pytest.raises(DestinationUnavailable, match="TLS"):
        send_files(destination(secure, tls), files, "ISDR")
    assert secure.files() == []


def test_unusable_tls_files_are_reported_before_connecting(tmp_path, storescps, pki):
    secure = tls_scp(storescps, pki)
    files = outgoing(tmp_path, ["CT_small.dcm"])

    with pytest.raises(DestinationUnavailable, match="TLS settings cannot be used"):
        send_files(destination(secure, DestinationTLS(ca_bundle=str(tmp_path / "missing.pem"))), files, "ISDR")
