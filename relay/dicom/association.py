"""One established association: P-DATA-TF in, DIMSE messages out (PS3.7, PS3.8 9.3.5).

C-ECHO is answered; each C-STORE's dataset goes fragment by fragment into an IncomingInstance
(relay.dicom.store) and is answered once it is durable; every other DIMSE service is answered
"unrecognized operation". Anything that breaks the protocol aborts the association.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

from relay.dicom.conformance import VERIFICATION, ContextResult
from relay.dicom.dimse import (C_CANCEL_RQ, C_ECHO_RQ, C_STORE_RQ, COMMAND_LIMIT, UNRECOGNIZED_OPERATION,
                               Command, CommandError, decode_command, encode_response)
from relay.dicom.pdu import (A_ABORT, A_RELEASE_RQ, ABORT_BY_PROVIDER, P_DATA_TF, PDU_NAMES, UNEXPECTED_PDU,
                             PduError, PduReader, a_abort, a_release_rp, p_data, pdvs)
from relay.dicom.store import IncomingInstance, StoredInstance
from relay.storage.base import StorageError, Upload

log = logging.getLogger("relay.receiver")
_COMMAND, _LAST = 0x01, 0x02


class AssociationEnded(Exception):
    """How the association ended, for the log: released, aborted by the peer, idle, closed."""


class Association:
    def __init__(self, sock: socket.socket, reader: PduReader, peer: str, calling_ae_title: str,
                 contexts: list[ContextResult], max_pdu: int, storage,
                 on_stored: Callable[[int, StoredInstance | None, str], None]):
        self._sock = sock
        self._reader = reader
        self.peer = peer  # "AE at address", for the log
        self.calling_ae_title = calling_ae_title
        self._contexts = {c.context_id: c for c in contexts if c.accepted}
        self._max_pdu = max_pdu
        self._storage = storage
        self._on_stored = on_stored
        self._command = bytearray()
        self._request: Command | None = None  # the request whose dataset is arriving
        self._instance: IncomingInstance | None = None
        self._dataset_context = 0
        # The next instance's upload, opened while the sender prepares it: creating a file costs
        # as much as receiving a small instance, and need not be on the path the sender waits on.
        self._spare: Upload | None = None

    def run(self) -> str:
        """Serve until the association ends; returns how it ended (released, or the reason it was
        aborted). Raises socket.timeout when the peer stays idle longer than the socket's timeout."""
        try:
            while True:
                pdu_type, body = self._reader.read(self._max_pdu)
                if pdu_type == P_DATA_TF:
                    for context_id, control, data in pdvs(body):
                        self._pdv(context_id, control, data)
                elif pdu_type == A_RELEASE_RQ:
                    self._sock.sendall(a_release_rp())
                    return "released"
                elif pdu_type == A_ABORT:
                    raise AssociationEnded("aborted by the peer")
                else:
                    raise PduError(f"unexpected {PDU_NAMES[pdu_type]} during the association", UNEXPECTED_PDU)
        finally:
            if self._instance is not None:
                self._instance.discard()  # an instance cut off by the end of the association
            if self._spare is not None:
                self._spare.discard()

    def abort(self, reason: int) -> None:
        try:
            self._sock.sendall(a_abort(ABORT_BY_PROVIDER, reason))
        except OSError:
            pass

    def _pdv(self, context_id: int, control: int, data: memoryview) -> None:
        context = self._contexts.get(context_id)
        if context is None:
            raise PduError(f"data on presentation context {context_id}, which was not accepted")
        if control & _COMMAND:
            if self._request is not None:
                raise PduError("a command arrived before the previous request's dataset was complete")
            if len(self._command) + len(data) > COMMAND_LIMIT:
                raise PduError(f"command set longer than {COMMAND_LIMIT} bytes")
            self._command += data
            if control & _LAST:
                command, self._command = bytes(self._command), bytearray()
                self._handle_command(context, command)
            return
        if self._request is None or context_id != self._dataset_context:
            raise PduError("a dataset arrived without a request for it")
        if self._instance is not None:
            self._instance.write(data)
        if control & _LAST:
            request, self._request = self._request, None
            if self._instance is not None:
                instance, self._instance = self._instance, None
                status, stored = instance.finish()
                try:
                    self._respond(context_id, request, status)  # durable: the sender may go on
                finally:
                    # Registered while the sender prepares its next instance, and even if the
                    # answer could not be sent (the instance is stored all the same).
                    self._on_stored(status, stored, self.calling_ae_title)
                self._open_spare()
            else:
                self._respond(context_id, request, UNRECOGNIZED_OPERATION)

    def _handle_command(self, context: ContextResult, data: bytes) -> None:
        try:
            request = decode_command(data)
        except CommandError as exc:
            raise PduError(f"undecodable command set: {exc}") from None
        field = request.field
        if field == C_ECHO_RQ:
            self._respond(context.context_id, request, 0x0000, VERIFICATION)
        elif field == C_STORE_RQ and request.has_dataset:
            self._request, self._dataset_context = request, context.context_id
            spare, self._spare = self._spare, None
            self._instance = IncomingInstance(self._storage, context.transfer_syntax, request.affected_sop_class_uid,
                                              request.affected_sop_instance_uid, self.calling_ae_title, spare)
        elif field == C_CANCEL_RQ:
            return  # nothing of ours runs long enough to be cancelled; C-CANCEL has no response
        else:
            log.warning("association from %s asked for %s, which this relay does not perform (only C-STORE and "
                        "C-ECHO): answered 'unrecognized operation'", self.peer, request.name)
            if request.has_dataset:
                self._request, self._dataset_context = request, context.context_id  # read and dropped
            else:
                self._respond(context.context_id, request, UNRECOGNIZED_OPERATION)

    def _open_spare(self) -> None:
        try:
            self._spare = self._storage.open_upload()
        except StorageError:
            self._spare = None  # the next instance opens its own, and answers the failure

    def _respond(self, context_id: int, request: Command, status: int, sop_class_uid: str | None = None) -> None:
        self._sock.sendall(p_data(context_id, _COMMAND | _LAST, encode_response(request, status, sop_class_uid)))
