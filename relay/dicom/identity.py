"""What the relay needs to know about a received instance, read from its encoded bytes.

The dataset is parsed element by element (no pixel decoding, no re-encoding) so that a truncated
or malformed dataset is noticed before it is acknowledged. Free-text attributes are read
defensively: they come from the network and only ever feed matching, never a path.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from relay.fingerprints.model import SeriesAttributes
from relay.uids import SeriesKey, require_uid

DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
UNDEFINED_LENGTH = 0xFFFFFFFF
# (FFFE,E0DD) Sequence Delimitation Item with its zero length, as it ends the stream.
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
_FREE_TEXT_LIMIT = 256  # LO is 64 characters; anything much longer is garbage, not a description
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
_STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _MODALITY = 0x0020000D, 0x0020000E, 0x00080060


class UndecodableDataset(ValueError):
    """The bytes are not a dataset in the negotiated transfer syntax."""


@dataclass(frozen=True)
class InstanceIdentity:
    series: SeriesKey
    sop_instance_uid: str
    study_uid: str | None
    attributes: SeriesAttributes


def parse_dataset(raw: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """Decode the element structure of a dataset encoded in `transfer_syntax` (no pixel decoding)."""
    ts = UID(transfer_syntax)
    data = bytes(raw)
    if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise UndecodableDataset(f"deflated dataset does not inflate: {exc}") from None
    try:
        implicit = ts.is_implicit_VR
        little = ts.is_little_endian
    except (AttributeError, ValueError):
        # A private/unknown transfer syntax: the dataset itself is explicit VR little endian
        # for every encapsulated syntax in the standard.
        implicit, little = False, True
    try:
        dataset = read_dataset(io.BytesIO(data), implicit, little)
        _check_complete(dataset, data, little)
    except UndecodableDataset:
        raise
    except Exception as exc:  # pydicom raises many types for malformed input
        raise UndecodableDataset(f"dataset cannot be decoded: {type(exc).__name__}: {exc}") from None
    if len(dataset) == 0:
        raise UndecodableDataset("dataset is empty")
    return dataset


def _check_complete(dataset: Dataset, data: bytes, little_endian: bool) -> None:
    """Every element holds as many bytes as its header says.

    pydicom reads a value cut short at the end of the stream without complaint; a truncated
    instance must be refused now, not acknowledged and found broken later. Checking the raw
    elements (not decoding them) keeps this cheap: a defined length covers everything inside
    it, and an undefined-length value (a sequence, encapsulated pixel data) that ran into the
    end of the stream is the last element and lacks its closing delimiter."""
    last = None
    for tag in dataset.keys():
        raw = dataset._dict[tag]
        if not isinstance(raw, RawDataElement):
            continue
        last = raw
        if raw.length != UNDEFINED_LENGTH and raw.value is not None and len(raw.value) != raw.length:
            raise UndecodableDataset(
                f"dataset cannot be decoded: element {tag} is cut short "
                f"({len(raw.value)} of {raw.length} bytes)")
    if last is not None and last.length == UNDEFINED_LENGTH:
        delimiter = _SEQUENCE_DELIMITER_LE if little_endian else _SEQUENCE_DELIMITER_BE
        if not data.endswith(delimiter):
            raise UndecodableDataset(
                f"dataset cannot be decoded: element {last.tag} ends without its delimiter")


def _text(dataset: Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword, "")
    except Exception:  # a value in a broken character set: matching sees ""
        return ""
    text = "" if value is None else str(value)
    return text[:_FREE_TEXT_LIMIT]


def _ascii(dataset: Dataset, tag: int) -> str:
    """An ASCII-only value (UI, CS) read from its raw bytes.

    These are read for every instance; pydicom's conversion and validation of each value costs
    more than the rest of identifying, and require_uid checks UIDs more strictly anyway."""
    element = dataset._dict.get(tag)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return value.decode("ascii", "replace")
    return "" if value is None else str(value)  # already converted (a dataset built in memory)


def identify(dataset: Dataset) -> InstanceIdentity:
    """Validated identity of an instance; raises InvalidUID naming the attribute at fault."""
    sop_class_uid = require_uid("SOPClassUID", _ascii(dataset, _SOP_CLASS_UID))
    sop_instance_uid = require_uid("SOPInstanceUID", _ascii(dataset, _SOP_INSTANCE_UID))
    series_uid = require_uid("SeriesInstanceUID", _ascii(dataset, _SERIES_INSTANCE_UID))
    study = _ascii(dataset, _STUDY_INSTANCE_UID).rstrip("\x00 ")
    study_uid = require_uid("StudyInstanceUID", study) if study else None
    return InstanceIdentity(
        series=SeriesKey(series_uid, sop_class_uid),
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        attributes=SeriesAttributes(
            modality=_ascii(dataset, _MODALITY).strip("\x00 ")[:_FREE_TEXT_LIMIT],
            sop_class_uid=sop_class_uid,
            series_description=_text(dataset, "SeriesDescription"),
            study_description=_text(dataset, "StudyDescription"),
        ),
    )


def identify_part10(data: bytes) -> InstanceIdentity:
    """Identity of a stored instance (a DICOM file's bytes), e.g. when resuming from storage."""
    import pydicom

    return identify(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))
