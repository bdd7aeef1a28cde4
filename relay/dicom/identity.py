"""What the relay needs to know about a received instance, read from its encoded bytes.

The receiver reads the identity from the top-level values the dataset walker kept while the
instance streamed to its file (relay.dicom.dataset_stream): no pixel decoding, no second pass.
Free-text attributes are read defensively: they come from the network and only ever feed
matching, never a path.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.charset import convert_encodings, decode_bytes

from relay.fingerprints.model import SeriesAttributes
from relay.uids import SeriesKey, require_uid

FREE_TEXT_LIMIT = 256  # LO is 64 characters; anything much longer is garbage, not a description
SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080005, 0x00080016, 0x00080018
MODALITY, STUDY_DESCRIPTION, SERIES_DESCRIPTION = 0x00080060, 0x00081030, 0x0008103E
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
IDENTITY_TAGS = frozenset({SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_INSTANCE_UID, MODALITY, STUDY_DESCRIPTION,
                           SERIES_DESCRIPTION, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID})


@dataclass(frozen=True)
class InstanceIdentity:
    series: SeriesKey
    sop_instance_uid: str
    study_uid: str | None
    attributes: SeriesAttributes


def _ascii(values: dict[int, bytes], tag: int) -> str:
    """A UI or CS value without its padding (NUL for UIDs, space for code strings)."""
    return values.get(tag, b"").decode("ascii", "replace").strip("\x00 ")


def _text(values: dict[int, bytes], tag: int) -> str:
    raw = values.get(tag, b"")
    if not raw:
        return ""
    try:
        charsets = values.get(SPECIFIC_CHARACTER_SET, b"").decode("ascii").strip("\x00 ").split("\\")
        text = decode_bytes(raw, convert_encodings([c.strip() for c in charsets] or ["ISO_IR 6"]), {0x5c})
    except Exception:  # a value in a broken character set: read what can be read
        text = raw.decode("latin-1")
    return text.strip("\x00 ")[:FREE_TEXT_LIMIT]


def identify(values: dict[int, bytes]) -> InstanceIdentity:
    """Validated identity from an instance's raw top-level values (tag -> encoded bytes);
    raises InvalidUID naming the attribute at fault."""
    sop_class_uid = require_uid("SOPClassUID", _ascii(values, SOP_CLASS_UID))
    sop_instance_uid = require_uid("SOPInstanceUID", _ascii(values, SOP_INSTANCE_UID))
    series_uid = require_uid("SeriesInstanceUID", _ascii(values, SERIES_INSTANCE_UID))
    study = _ascii(values, STUDY_INSTANCE_UID)
    study_uid = require_uid("StudyInstanceUID", study) if study else None
    return InstanceIdentity(
        series=SeriesKey(series_uid, sop_class_uid),
        sop_instance_uid=sop_instance_uid,
        study_uid=study_uid,
        attributes=SeriesAttributes(
            modality=_ascii(values, MODALITY)[:FREE_TEXT_LIMIT],
            sop_class_uid=sop_class_uid,
            series_description=_text(values, SERIES_DESCRIPTION),
            study_description=_text(values, STUDY_DESCRIPTION),
            study_uid=study_uid or "",
        ),
    )


def identify_part10(data: bytes) -> InstanceIdentity:
    """Identity of a stored instance (a DICOM file's bytes), e.g. when resuming from storage."""
    return identify_part10_stream(io.BytesIO(data))


STREAM_CHUNK = 1 << 20


def identify_part10_stream(handle: BinaryIO) -> InstanceIdentity:
    """The same, read from an open file in chunks: memory stays bounded however large it is."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from relay.dicom.conformance import encoding_of
    from relay.dicom.dataset_stream import DatasetWalker

    read_preamble(handle, False)
    meta = _read_file_meta_info(handle)
    walker = DatasetWalker(encoding_of(str(meta.TransferSyntaxUID)), IDENTITY_TAGS)
    while chunk := handle.read(STREAM_CHUNK):
        walker.feed(memoryview(chunk))
    return identify(walker.finish())
