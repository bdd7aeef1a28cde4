"""A DICOM peer that misbehaves on purpose: raw sockets that connect and say nothing, associate and
go quiet, or announce absurd PDU lengths. The A-ASSOCIATE-RQ is encoded by pynetdicom, so what is
sent is a well-formed request up to the point where the test makes it misbehave."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


def associate_rq(called: str = "ISDR", calling: str = "PROBE", abstract_syntax: str = VERIFICATION,
                 transfer_syntaxes=(IMPLICIT_VR_LITTLE_ENDIAN,)) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(abstract_syntax, list(transfer_syntaxes))
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    return A_ASSOCIATE_RQ(primitive).encode()


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the relay on 127.0.0.1 from `source` (any address of 127.0.0.0/8)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU; (0, b"") when the relay closed the connection."""
    header = _read_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def idle_association(port: int, source: str = "127.0.0.1", calling: str = "IDLE") -> socket.socket:
    """An association that is established and then says nothing."""
    sock = connect(port, source)
    sock.sendall(associate_rq(calling=calling))
    pdu_type, _ = read_pdu(sock)
    if pdu_type != A_ASSOCIATE_AC:
        sock.close()
        raise ConnectionRefusedError(f"association from {source} not accepted (PDU type {pdu_type:#x})")
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the relay closes (or aborts) the connection within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
            if data[0] == A_ABORT:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values
