"""The DICOM upper layer on a socket (PS3.8 9.3): reading PDUs within bounds, writing the few the
receiver sends itself.

Every PDU's length is checked against a limit before a byte of its body is read, so what a peer
announces never decides what the relay allocates; the buffer grows only as far as the limit.
Association PDUs (A-ASSOCIATE-RQ/AC) are decoded and encoded by pynetdicom (relay.dicom.acse);
the small fixed-layout PDUs and the P-DATA-TF framing are done here, on the hot path.
"""

from __future__ import annotations

import socket
import struct
import time

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC", A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
             P_DATA_TF: "P-DATA-TF", A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT"}
HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_INITIAL_BUFFER = 64 * 1024

# A-ABORT source and reasons (PS3.8 9.3.8).
ABORT_BY_USER, ABORT_BY_PROVIDER = 0x00, 0x02
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0x00, 0x01, 0x02
INVALID_PDU_PARAMETER = 0x06


class PduError(Exception):
    """The peer broke the protocol; the association is aborted (reason: the A-ABORT reason)."""

    def __init__(self, message: str, reason: int = INVALID_PDU_PARAMETER):
        super().__init__(message)
        self.reason = reason


class PduTooLong(PduError):
    pass


class PeerClosed(Exception):
    """The peer closed the connection (or reset it)."""


class PduReader:
    """Reads whole PDUs from a socket through one bounded, reused buffer.

    `read` returns a view of the PDU body that is valid until the next `read`. The socket's own
    timeout applies to each wait for data; `deadline` (monotonic seconds) bounds the whole PDU."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray(_INITIAL_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self.bytes_read = 0

    def read(self, limit: int, deadline: float | None = None) -> tuple[int, memoryview]:
        self._fill(HEADER.size, deadline)
        pdu_type, length = HEADER.unpack_from(self._buffer, self._start)
        if pdu_type not in PDU_NAMES:
            raise PduError(f"unknown PDU type {pdu_type:#04x}", UNRECOGNIZED_PDU)
        if length > limit:
            raise PduTooLong(f"{PDU_NAMES[pdu_type]} of {length} bytes is longer than the limit of {limit} bytes")
        self._fill(HEADER.size + length, deadline)
        body = self._view[self._start + HEADER.size:self._start + HEADER.size + length]
        self._start += HEADER.size + length
        return pdu_type, body

    def _fill(self, size: int, deadline: float | None) -> None:
        """Make `size` bytes available from self._start."""
        if self._end - self._start >= size:
            return
        if self._start + size > len(self._buffer):
            self._make_room(size)
        while self._end - self._start < size:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("deadline passed")
                self._sock.settimeout(remaining)
            try:
                count = self._sock.recv_into(self._view[self._end:])
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from None
            if not count:
                raise PeerClosed("connection closed")
            self._end += count
            self.bytes_read += count

    def _make_room(self, size: int) -> None:
        pending = self._end - self._start
        if size > len(self._buffer):
            # Grow to what this PDU needs (bounded by the caller's limit); a later small PDU reuses it.
            buffer = bytearray(max(size, 2 * len(self._buffer)))
            buffer[:pending] = self._view[self._start:self._end]
            self._buffer, self._view = buffer, memoryview(buffer)
        else:
            self._view[:pending] = self._view[self._start:self._end]
        self._start, self._end = 0, pending


def pdvs(body: memoryview):
    """The presentation data values of a P-DATA-TF body: (context id, control header, data view)."""
    position, end = 0, len(body)
    while position < end:
        if end - position < _PDV_HEADER.size:
            raise PduError("P-DATA-TF ends inside a PDV header")
        length, context_id, control = _PDV_HEADER.unpack_from(body, position)
        if length < 2 or position + 4 + length > end:
            raise PduError(f"PDV of {length} bytes does not fit its P-DATA-TF")
        yield context_id, control, body[position + 6:position + 4 + length]
        position += 4 + length


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF with one PDV (the receiver's responses are single, small command sets)."""
    return HEADER.pack(P_DATA_TF, 6 + len(data)) + _PDV_HEADER.pack(2 + len(data), context_id, control) + data


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    return HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes([0, result, source, reason])


def a_release_rp() -> bytes:
    return HEADER.pack(A_RELEASE_RP, 4) + bytes(4)


def a_abort(source: int, reason: int) -> bytes:
    return HEADER.pack(A_ABORT, 4) + bytes([0, 0, source, reason])
