"""The DICOM file header (preamble, 'DICM', file meta group) for a received dataset.

Encoded by hand because it is written once per received instance, on the path that the sender
waits on: pydicom's general writer takes about as long as storing the instance itself. The group
is tiny and fixed (PS3.10 7.1), always explicit VR little endian.
"""

from __future__ import annotations

import struct

# ISDR's implementation class UID: a UUID-derived UID (PS3.5 B.2), needing no registered root.
IMPLEMENTATION_CLASS_UID = "2.25.229104730411473914612381436377466063577"
IMPLEMENTATION_VERSION_NAME = "ISDR_0_1"
_LONG_LENGTH_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"}


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr in _LONG_LENGTH_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                source_ae_title: str = "") -> bytes:
    body = b"".join([
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ] + ([_element(0x0016, b"AE", source_ae_title.encode("ascii", "replace")[:16])]
         if source_ae_title else []))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body
