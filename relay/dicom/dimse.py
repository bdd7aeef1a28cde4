"""DIMSE command sets (PS3.7 9.3, E): decoding the requests the receiver gets, encoding its
responses. Command sets are always implicit VR little endian group 0000 elements; they are small
and fixed, so they are read and written by hand, on the path every C-STORE takes."""

from __future__ import annotations

import struct

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
COMMAND_NAMES = {0x0001: "C-STORE", 0x0010: "C-GET", 0x0020: "C-FIND", 0x0021: "C-MOVE", 0x0030: "C-ECHO",
                 0x0100: "N-EVENT-REPORT", 0x0110: "N-GET", 0x0120: "N-SET", 0x0130: "N-ACTION",
                 0x0140: "N-CREATE", 0x0150: "N-DELETE", 0x0FFF: "C-CANCEL"}
NO_DATASET = 0x0101
COMMAND_LIMIT = 64 * 1024  # a command set is a few hundred bytes; more is not a command

AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID = 0x00000002, 0x00000100, 0x00000110
MESSAGE_ID_BEING_RESPONDED_TO, COMMAND_DATA_SET_TYPE, STATUS = 0x00000120, 0x00000800, 0x00000900
AFFECTED_SOP_INSTANCE_UID = 0x00001000
# Status 0x0211: the service is not one this SCP performs (PS3.7 C.5.5).
UNRECOGNIZED_OPERATION = 0x0211

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


class CommandError(ValueError):
    pass


class Command:
    """A decoded request: its elements as raw bytes, read by the accessors."""

    def __init__(self, elements: dict[int, bytes]):
        self._elements = elements

    def _us(self, tag: int) -> int | None:
        value = self._elements.get(tag)
        return _US.unpack(value[:2])[0] if value is not None and len(value) >= 2 else None

    def _ui(self, tag: int) -> str:
        return self._elements.get(tag, b"").decode("ascii", "replace").strip("\x00 ")

    @property
    def field(self) -> int | None:
        return self._us(COMMAND_FIELD)

    @property
    def name(self) -> str:
        field = self.field
        return COMMAND_NAMES.get(field, f"command {field:#06x}") if field is not None else "command without a field"

    @property
    def message_id(self) -> int:
        return self._us(MESSAGE_ID) or 0

    @property
    def has_dataset(self) -> bool:
        return self._us(COMMAND_DATA_SET_TYPE) != NO_DATASET

    @property
    def affected_sop_class_uid(self) -> str:
        return self._ui(AFFECTED_SOP_CLASS_UID)

    @property
    def affected_sop_instance_uid(self) -> str:
        return self._ui(AFFECTED_SOP_INSTANCE_UID)


def decode_command(data: bytes | memoryview) -> Command:
    elements: dict[int, bytes] = {}
    position, end = 0, len(data)
    while position < end:
        if end - position < _ELEMENT.size:
            raise CommandError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, position)
        position += _ELEMENT.size
        if group != 0x0000 or position + length > end:
            raise CommandError(f"command set element ({group:04X},{element:04X}) is malformed")
        elements[element] = bytes(data[position:position + length])
        position += length
    command = Command(elements)
    if command.field is None:
        raise CommandError("command set has no Command Field")
    return command


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def encode_response(request: Command, status: int, sop_class_uid: str | None = None) -> bytes:
    """The response to `request` (its command field with the response bit, no dataset)."""
    body = b"".join([
        _element(AFFECTED_SOP_CLASS_UID, (sop_class_uid or request.affected_sop_class_uid).encode("ascii", "replace")),
        _element(COMMAND_FIELD, _US.pack(request.field | 0x8000)),
        _element(MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(request.message_id)),
        _element(COMMAND_DATA_SET_TYPE, _US.pack(NO_DATASET)),
        _element(STATUS, _US.pack(status)),
    ] + ([_element(AFFECTED_SOP_INSTANCE_UID, request.affected_sop_instance_uid.encode("ascii", "replace"))]
         if request.affected_sop_instance_uid else []))
    return _element(0x0000, struct.pack("<I", len(body))) + body
