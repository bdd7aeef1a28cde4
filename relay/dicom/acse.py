"""Association establishment (PS3.8 7.1, 9.3.2-9.3.4): the A-ASSOCIATE-RQ decoded and the
A-ASSOCIATE-AC encoded by pynetdicom's PDU codecs, the choice of contexts made by
relay.dicom.conformance."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_AC as _AcPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as _RqPdu
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext

from relay.dicom.conformance import ContextResult, ProposedContext
from relay.dicom.file_meta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from relay.dicom.pdu import A_ASSOCIATE_RQ, PduError

# A-ASSOCIATE-RJ result, source and reasons (PS3.8 9.3.4).
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
NO_REASON, CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x01, 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    contexts: tuple[ProposedContext, ...]
    peer_max_pdu: int  # 0: no limit
    application_context_name: str


def decode_request(body: memoryview) -> AssociationRequest:
    pdu = _RqPdu()
    try:
        pdu.decode(struct.pack(">BxI", A_ASSOCIATE_RQ, len(body)) + bytes(body))
        primitive = pdu.to_primitive()
        contexts = tuple(
            ProposedContext(int(cx.context_id), str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
            for cx in primitive.presentation_context_definition_list)
    except Exception as exc:  # pynetdicom raises many kinds for malformed input
        raise PduError(f"A-ASSOCIATE-RQ cannot be decoded: {type(exc).__name__}: {exc}") from None
    peer_max = 0
    for item in primitive.user_information or ():
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
    return AssociationRequest(
        calling_ae_title=_ae(primitive.calling_ae_title),
        called_ae_title=_ae(primitive.called_ae_title),
        contexts=contexts,
        peer_max_pdu=peer_max,
        application_context_name=str(primitive.application_context_name),
    )


def _ae(value) -> str:
    """An AE title as the peer sent it, printable ASCII only (it goes into the log)."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()


def encode_accept(request: AssociationRequest, results: list[ContextResult], max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = request.application_context_name
    primitive.calling_ae_title = request.calling_ae_title or "UNKNOWN"
    primitive.called_ae_title = request.called_ae_title or "UNKNOWN"
    primitive.result = 0x00
    contexts = []
    for result in results:
        context = PresentationContext()
        context.context_id = result.context_id
        context.abstract_syntax = result.abstract_syntax
        context.transfer_syntax = [result.transfer_syntax]
        context.result = result.result
        contexts.append(context)
    primitive.presentation_context_definition_results_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    primitive.user_information = [length, implementation, version]
    return _AcPdu(primitive).encode()
