"""The receiver's protocol layers on their own: negotiation rules, the dataset walker, PDU limits,
DIMSE command sets. (The same code against real peers: tests/integration/test_receiver_*.py.)"""

from __future__ import annotations

import io
import socket
import struct
import threading
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from relay.dicom import conformance as cf
from relay.dicom.dataset_stream import DatasetWalker, UndecodableDataset
from relay.dicom.dimse import C_STORE_RQ, decode_command, encode_response
from relay.dicom.identity import IDENTITY_TAGS, identify
from relay.dicom.pdu import PduError, PduReader, PduTooLong, pdvs

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


# --- negotiation ------------------------------------------------------------------------------

def negotiate_one(abstract_syntax, transfer_syntaxes, accept_unknown=False):
    (result,) = cf.negotiate([cf.ProposedContext(1, abstract_syntax, transfer_syntaxes)], accept_unknown)
    return result


def test_the_first_proposed_transfer_syntax_the_relay_knows_is_accepted():
    assert negotiate_one(CT, [JPEG_BASELINE, cf.EXPLICIT_VR_LITTLE_ENDIAN]).transfer_syntax == JPEG_BASELINE
    assert negotiate_one(CT, ["1.2.3.4.5", cf.EXPLICIT_VR_BIG_ENDIAN]).transfer_syntax == cf.EXPLICIT_VR_BIG_ENDIAN


def test_a_context_with_only_unknown_transfer_syntaxes_is_refused_as_such():
    result = negotiate_one(CT, ["1.2.3.4.5"])
    assert result.result == cf.TRANSFER_SYNTAXES_NOT_SUPPORTED and "1.2.3.4.5" in result.reason


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.35",
                                 "1.2.840.10008.5.1.4.39.1", "1.2.840.10008.5.1.4.1.1.13.1.4"])
def test_storage_classes_beyond_an_scus_128_contexts_are_accepted(uid):
    assert negotiate_one(uid, [cf.EXPLICIT_VR_LITTLE_ENDIAN]).accepted


def test_private_sop_classes_are_accepted_only_when_allowed():
    refused = negotiate_one("1.3.12.2.1107.5.9.1", [cf.EXPLICIT_VR_LITTLE_ENDIAN])
    assert refused.result == cf.ABSTRACT_SYNTAX_NOT_SUPPORTED and "SCP_ACCEPT_UNKNOWN_SOP_CLASSES" in refused.reason
    assert negotiate_one("1.3.12.2.1107.5.9.1", [cf.EXPLICIT_VR_LITTLE_ENDIAN], accept_unknown=True).accepted


def test_standard_non_storage_classes_are_refused_even_when_unknown_ones_are_allowed():
    result = negotiate_one("1.2.840.10008.5.1.4.1.2.2.1", [cf.IMPLICIT_VR_LITTLE_ENDIAN], accept_unknown=True)
    assert result.result == cf.ABSTRACT_SYNTAX_NOT_SUPPORTED and "not a storage SOP class" in result.reason


# --- the dataset walker -----------------------------------------------------------------------

def ct_dataset(**overrides) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CT, "1.2.3.4.5"
    ds.Modality, ds.SeriesDescription, ds.StudyDescription = "CT", "Thorax Ä", "Lung"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    item = Dataset()
    item.CodeValue = "123"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 64
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, implicit=True, little=True, undefined_sequences=False) -> bytes:
    if undefined_sequences:
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def walk(data: bytes, encoding=cf.Encoding(True, True, False), chunk: int | None = None) -> dict:
    walker = DatasetWalker(encoding, IDENTITY_TAGS)
    step = chunk or len(data) or 1
    for start in range(0, len(data), step):
        walker.feed(data[start:start + step])
    return walker.finish()


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("undefined", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_identity_is_read_in_every_uncompressed_encoding_whatever_the_fragments(implicit, little, undefined, chunk):
    data = encode(ct_dataset(), implicit, little, undefined)
    identity = identify(walk(data, cf.Encoding(implicit, little, False), chunk))
    assert identity.series.series_uid == "1.2.3.4" and identity.sop_instance_uid == "1.2.3.4.5"
    assert identity.attributes.series_description == "Thorax Ä"  # decoded in its character set
    assert identity.attributes.modality == "CT" and identity.study_uid == "1.2.3"


def test_a_deflated_dataset_is_walked_inflated():
    raw = encode(ct_dataset(), implicit=False)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = compressor.compress(raw) + compressor.flush()
    assert identify(walk(deflated, cf.Encoding(False, True, True), chunk=7)).sop_instance_uid == "1.2.3.4.5"


def test_encapsulated_pixel_data_is_walked_item_by_item():
    ds = ct_dataset()
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8frame1\xff\xd9", b"\xff\xd8frame2\xff\xd9"])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    data = encode(ds, implicit=False)
    assert walk(data, cf.Encoding(False, True, False), chunk=3)
    with pytest.raises(UndecodableDataset, match="delimiter"):
        walk(data[:-8], cf.Encoding(False, True, False))


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_a_dataset_cut_short_is_undecodable(cut):
    data = encode(ct_dataset())
    with pytest.raises(UndecodableDataset):
        walk(data[:-cut])


def test_garbage_stray_delimiters_and_empty_datasets_are_undecodable():
    with pytest.raises(UndecodableDataset, match="VR"):
        walk(b"\x08\x00\x18\x00\x01\x02" + b"\x00" * 40, cf.Encoding(False, True, False))
    with pytest.raises(UndecodableDataset, match="delimiter"):
        walk(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    with pytest.raises(UndecodableDataset, match="empty"):
        walk(b"")


def test_nesting_deeper_than_any_real_object_is_undecodable():
    opening = struct.pack("<HHI", 0x0040, 0x0260, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    with pytest.raises(UndecodableDataset, match="nested"):
        walk(opening * 50_000)


def test_only_short_top_level_values_are_kept():
    ds = ct_dataset(SeriesDescription="x" * 2000)
    captured = walk(encode(ds))
    assert 0x0008103E not in captured and captured[0x0020000E].rstrip(b"\x00") == b"1.2.3.4"


# --- PDUs -------------------------------------------------------------------------------------

@pytest.fixture
def pipe():
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    yield ours, theirs
    ours.close(), theirs.close()


def test_a_pdu_longer_than_the_limit_is_refused_before_its_body_is_read(pipe):
    ours, theirs = pipe
    theirs.sendall(struct.pack(">BxI", 0x04, 0xFFFFFFF0) + b"\x00" * 1000)
    reader = PduReader(ours)
    with pytest.raises(PduTooLong, match="4294967280 bytes is longer than the limit of 16384"):
        reader.read(16384)
    assert reader.bytes_read < 70 * 1024  # one buffer's worth at most, not the claim


def test_pdus_of_every_size_come_back_whole_in_order(pipe):
    ours, theirs = pipe
    bodies = [bytes([n % 256]) * size for n, size in enumerate([0, 1, 70_000, 5, 200_000, 3])]
    sender = threading.Thread(target=lambda: [theirs.sendall(struct.pack(">BxI", 0x04, len(b)) + b) for b in bodies])
    sender.start()
    reader = PduReader(ours)
    received = [bytes(reader.read(256 * 1024)[1]) for _ in bodies]
    sender.join()
    assert received == bodies


def test_unknown_pdu_types_and_pdvs_that_overrun_their_pdu_are_protocol_errors(pipe):
    ours, theirs = pipe
    theirs.sendall(struct.pack(">BxI", 0x09, 0))
    with pytest.raises(PduError, match="unknown PDU type"):
        PduReader(ours).read(1024)
    with pytest.raises(PduError, match="does not fit"):
        list(pdvs(memoryview(struct.pack(">IBB", 100, 1, 3) + b"x")))


# --- DIMSE ------------------------------------------------------------------------------------

def test_a_c_store_response_answers_the_request_it_was_decoded_from():
    from pynetdicom.dimse_messages import C_STORE_RQ as PynetdicomStore
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageID, primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = 7, CT, "1.2.3.9"
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(b"")
    message = PynetdicomStore()
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set)  # what pynetdicom's SCU puts in the command PDVs

    request = decode_command(encoded)
    assert (request.field, request.message_id, request.has_dataset) == (C_STORE_RQ, 7, True)
    response = pydicom.filereader.read_dataset(DicomBytesIO(encode_response(request, 0xA700)), True, True)
    assert (response.CommandField, response.MessageIDBeingRespondedTo, response.Status) == (0x8001, 7, 0xA700)
    assert response.AffectedSOPInstanceUID == "1.2.3.9" and response.CommandGroupLength > 0
