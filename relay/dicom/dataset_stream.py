"""Walks a dataset's element structure as its bytes arrive, without keeping them.

The receiver writes each fragment of a C-STORE dataset to its file and feeds it here. The walker
reads element headers only (values are skipped, never decoded), so memory stays constant however
large the instance is, and it notices what a broken or hostile sender gets wrong: a dataset cut
short (an element longer than what arrived, a sequence without its delimiter), invalid VRs,
stray delimiters, absurd nesting. On the way it keeps the short top-level values the relay needs
(UIDs, Modality, descriptions) in `captured`.
"""

from __future__ import annotations

import struct
import zlib
from typing import Collection

from relay.dicom.conformance import Encoding

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                              b"UT", b"UV"})
_TOP, _ITEM, _SEQUENCE = 0, 1, 2  # what the walker is inside of
MAX_DEPTH = 128  # sequences within sequences; real objects stay far below this
CAPTURE_LIMIT = 1024  # longest value kept; UIDs are 64, descriptions 64 characters
# Compiled once: (tag group and element, 32-bit length, 16-bit length) per byte order.
_LITTLE = (struct.Struct("<HH"), struct.Struct("<I"), struct.Struct("<H"))
_BIG = (struct.Struct(">HH"), struct.Struct(">I"), struct.Struct(">H"))
_INFLATE_CHUNK = 256 * 1024


class UndecodableDataset(ValueError):
    """The bytes are not a dataset in the negotiated transfer syntax."""


class DatasetWalker:
    def __init__(self, encoding: Encoding, capture: Collection[int] = ()):
        self._little = encoding.little_endian
        # One frame per nesting level: (what we are in, implicit VR there, little endian there).
        self._stack = [(_TOP, encoding.implicit_vr, encoding.little_endian)]
        self._capture_tags = frozenset(capture)
        self.captured: dict[int, bytes] = {}
        self.elements = 0
        self._pending = b""  # the start of a header cut by a fragment boundary
        self._skip = 0  # value bytes still to pass over
        self._capturing: bytearray | None = None
        self._capturing_tag = 0
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if encoding.deflated else None

    # --- feeding --------------------------------------------------------------------------

    def feed(self, data) -> None:
        if self._inflater is None:
            self._walk(memoryview(data))
            return
        try:
            chunk = self._inflater.decompress(data, _INFLATE_CHUNK)
            while chunk:
                self._walk(memoryview(chunk))
                chunk = self._inflater.decompress(self._inflater.unconsumed_tail, _INFLATE_CHUNK)
        except zlib.error as exc:
            raise UndecodableDataset(f"deflated dataset does not inflate: {exc}") from None

    def finish(self) -> dict[int, bytes]:
        """The captured values; raises UndecodableDataset if the dataset is not complete."""
        if self._inflater is not None:
            try:
                self._walk(memoryview(self._inflater.flush()))
            except zlib.error as exc:
                raise UndecodableDataset(f"deflated dataset does not inflate: {exc}") from None
        if self._skip or self._pending:
            raise UndecodableDataset("dataset cannot be decoded: the last element is cut short")
        if len(self._stack) > 1:
            raise UndecodableDataset("dataset cannot be decoded: a sequence ends without its delimiter")
        if not self.elements:
            raise UndecodableDataset("dataset is empty")
        return self.captured

    # --- walking --------------------------------------------------------------------------

    def _walk(self, view: memoryview) -> None:
        position, end = 0, len(view)
        if self._pending and end:
            joined = self._pending + bytes(view[:12])
            after = self._header(joined, 0, len(joined))
            if after is None:
                self._pending = joined
                return
            position = after - len(self._pending)
            self._pending = b""
        while position < end:
            if self._skip:
                take = min(self._skip, end - position)
                if self._capturing is not None:
                    self._capturing += view[position:position + take]
                self._skip -= take
                position += take
                if not self._skip and self._capturing is not None:
                    self.captured[self._capturing_tag] = bytes(self._capturing)
                    self._capturing = None
                continue
            after = self._header(view, position, end)
            if after is None:
                self._pending = bytes(view[position:end])
                return
            position = after

    def _header(self, buffer, position: int, end: int) -> int | None:
        """Read the element or item header at `position`; act on it; return where its value starts
        (None: the header is not complete in this buffer)."""
        if end - position < 8:
            return None
        kind, implicit, little = self._stack[-1]
        tag_struct, long_length, short_length = _LITTLE if little else _BIG
        group, element = tag_struct.unpack_from(buffer, position)
        tag = group << 16 | element
        if group == 0xFFFE:
            (length,) = long_length.unpack_from(buffer, position + 4)
            self._delimiter(kind, implicit, little, tag, length)
            return position + 8
        if kind == _SEQUENCE:
            raise UndecodableDataset(f"dataset cannot be decoded: element ({group:04X},{element:04X}) where "
                                     "a sequence item was expected")
        if implicit:
            vr = b""
            (length,) = long_length.unpack_from(buffer, position + 4)
            position += 8
        else:
            vr = bytes(buffer[position + 4:position + 6])
            if vr in _LONG_LENGTH_VRS:
                if end - position < 12:
                    return None
                (length,) = long_length.unpack_from(buffer, position + 8)
                position += 12
            elif vr.isalpha() and vr.isupper():
                (length,) = short_length.unpack_from(buffer, position + 6)
                position += 8
            else:
                raise UndecodableDataset(
                    f"dataset cannot be decoded: element ({group:04X},{element:04X}) has no valid VR")
        self.elements += 1
        if length == UNDEFINED_LENGTH:
            if not (implicit or vr in (b"SQ", b"UN", b"OB", b"OW")):
                raise UndecodableDataset(
                    f"dataset cannot be decoded: element ({group:04X},{element:04X}) of VR {vr.decode()} "
                    "has an undefined length")
            # An undefined-length UN is a sequence encoded in implicit VR little endian (PS3.5 6.2.2).
            self._push(_SEQUENCE, implicit or vr == b"UN", True if vr == b"UN" else little)
            return position
        if len(self._stack) == 1 and tag in self._capture_tags and length <= CAPTURE_LIMIT:
            self._capturing, self._capturing_tag = bytearray(), tag
            if length == 0:
                self.captured[tag], self._capturing = b"", None
        self._skip = length
        return position

    def _delimiter(self, kind: int, implicit: bool, little: bool, tag: int, length: int) -> None:
        if kind == _SEQUENCE and tag == ITEM:
            if length == UNDEFINED_LENGTH:
                self._push(_ITEM, implicit, little)
            else:
                self._skip = length
        elif kind == _SEQUENCE and tag == SEQUENCE_DELIMITER:
            self._stack.pop()
        elif kind == _ITEM and tag == ITEM_DELIMITER:
            self._stack.pop()
        else:
            raise UndecodableDataset(f"dataset cannot be decoded: unexpected delimiter ({tag >> 16:04X},"
                                     f"{tag & 0xFFFF:04X})")

    def _push(self, kind: int, implicit: bool, little: bool) -> None:
        if len(self._stack) > MAX_DEPTH:
            raise UndecodableDataset(f"dataset cannot be decoded: sequences nested deeper than {MAX_DEPTH}")
        self._stack.append((kind, implicit, little))
