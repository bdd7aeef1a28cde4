"""What the receiver accepts: SOP classes, transfer syntaxes, and how a presentation context is
negotiated (PS3.8 9.3.2.2, PS3.7 D.3.3.3). Pure rules over plain data, no sockets.

* Every standard storage SOP class (pydicom's UID dictionary and pynetdicom's storage service
  classes, retired ones included) and Verification. Private or unknown SOP classes only when the
  administrator allows them (SCP_ACCEPT_UNKNOWN_SOP_CLASSES); standard non-storage classes (query,
  retrieve, worklist, N-services) never: the relay stores, it answers nothing else.
* Every standard transfer syntax: the relay stores the dataset bytes as they arrive and never
  decodes pixel data, so it can take any of them.
* Of the transfer syntaxes a context proposes, the first one the relay supports: the sender's
  order is its preference (normally its file's own syntax first), and the relay never makes a
  sender convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from pydicom._uid_dict import UID_dictionary
from pynetdicom import sop_class as _pynetdicom_classes

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})

# Presentation context results (PS3.8 9.3.3.2).
ACCEPTANCE = 0
USER_REJECTION = 1
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4
CONTEXT_RESULTS = {ACCEPTANCE: "acceptance", USER_REJECTION: "user rejection",
                   ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax not supported",
                   TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntaxes not supported"}


def _standard_storage_classes() -> frozenset[str]:
    from_pydicom = {uid for uid, (name, kind, *_rest) in UID_dictionary.items()
                    if kind == "SOP Class" and "Storage" in name and "Storage Commitment" not in name}
    from_pynetdicom = set(_pynetdicom_classes._STORAGE_CLASSES.values())
    from_pynetdicom |= set(_pynetdicom_classes._NON_PATIENT_OBJECT_CLASSES.values())
    return frozenset(from_pydicom | from_pynetdicom)


STORAGE_SOP_CLASSES = _standard_storage_classes()
TRANSFER_SYNTAXES = frozenset(uid for uid, (_name, kind, *_rest) in UID_dictionary.items()
                              if kind == "Transfer Syntax")


class Encoding(NamedTuple):
    """How a transfer syntax encodes the dataset itself (pixel data aside)."""
    implicit_vr: bool
    little_endian: bool
    deflated: bool


def encoding_of(transfer_syntax: str) -> Encoding:
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return Encoding(True, True, False)
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return Encoding(False, False, False)
    # Every other standard syntax, encapsulated ones included, is explicit VR little endian.
    return Encoding(False, True, transfer_syntax in _DEFLATED)


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: Sequence[str]


@dataclass(frozen=True)
class ContextResult:
    context_id: int
    abstract_syntax: str
    result: int
    transfer_syntax: str  # the accepted one; for a refusal, the first proposed (the PDU needs one)
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.result == ACCEPTANCE


def is_known_sop_class(uid: str) -> bool:
    return uid in UID_dictionary or uid in STORAGE_SOP_CLASSES


def negotiate(proposed: Iterable[ProposedContext], accept_unknown_sop_classes: bool) -> list[ContextResult]:
    return [_negotiate_one(context, accept_unknown_sop_classes) for context in proposed]


def _negotiate_one(context: ProposedContext, accept_unknown: bool) -> ContextResult:
    uid = context.abstract_syntax
    first = context.transfer_syntaxes[0] if context.transfer_syntaxes else IMPLICIT_VR_LITTLE_ENDIAN

    def refuse(result: int, reason: str) -> ContextResult:
        return ContextResult(context.context_id, uid, result, first, reason)

    if uid != VERIFICATION and uid not in STORAGE_SOP_CLASSES:
        if is_known_sop_class(uid):
            name = UID_dictionary[uid][0] if uid in UID_dictionary else uid
            return refuse(ABSTRACT_SYNTAX_NOT_SUPPORTED,
                          f"{name} is not a storage SOP class (only C-STORE and C-ECHO are served)")
        if not accept_unknown:
            return refuse(ABSTRACT_SYNTAX_NOT_SUPPORTED,
                          "unknown or private SOP class (set SCP_ACCEPT_UNKNOWN_SOP_CLASSES=true to accept it)")
    for transfer_syntax in context.transfer_syntaxes:
        if transfer_syntax in TRANSFER_SYNTAXES:
            return ContextResult(context.context_id, uid, ACCEPTANCE, transfer_syntax)
    return refuse(TRANSFER_SYNTAXES_NOT_SUPPORTED,
                  f"none of the proposed transfer syntaxes is supported: {', '.join(context.transfer_syntaxes)[:200]}")
