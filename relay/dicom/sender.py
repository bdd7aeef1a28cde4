"""Delivery of predictions to a DICOM destination (C-STORE SCU), over TCP or TLS.

Presentation contexts are built from the files actually sent: for each SOP class, one context
per transfer syntax, so that the destination accepts or refuses each syntax on its own. A file
is offered in its own syntax and, where it can be converted (relay.dicom.transcode), in explicit
and implicit VR little endian too. It is sent as it is when the destination accepted its own
syntax, and converted otherwise. A destination's status is kept per instance, so that a retry
resends only what it has not accepted yet.

TLS (PS3.15 secure transport) is per destination: its certificate is verified against the
destination's CA bundle (or the system's CAs) and must name its host (or tls.server_name); a
client certificate is shown when configured (mutual TLS). A failed handshake is reported with
its reason, and, like any connection failure, retried by the delivery rules.
"""

from __future__ import annotations

import logging
import ssl
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pydicom
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context

from relay.dicom.network import NODELAY_HANDLER
from relay.dicom.transcode import (
    DEFAULT_MAX_DECODED_BYTES,
    ConversionError,
    conversion_targets,
    convert,
    decoder_available,
)
from relay.fingerprints.model import Destination, DestinationTLS

log = logging.getLogger("relay.sender")

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts in one association
NOT_SENT = 0x0122  # the status recorded for a file that no accepted context could carry

# Send each file's dataset bytes as they are on disk instead of decoding and re-encoding them:
# faster, and what the destination gets is exactly what the model produced (or what
# relay.dicom.transcode wrote). Each file is sent in a context of its own syntax.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


class DestinationUnavailable(Exception):
    """No association could be made (refused, rejected, aborted): worth retrying later."""


@dataclass(frozen=True)
class OutgoingFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass
class DeliveryResult:
    accepted: list[str] = field(default_factory=list)  # SOP Instance UIDs
    # SOP Instance UID -> (status, meaning): the destination's status, NOT_SENT when no accepted
    # context could carry the file, None when no answer came
    refused: dict[str, tuple[int | None, str]] = field(default_factory=dict)

    @property
    def transient_refusals(self) -> dict[str, tuple[int | None, str]]:
        """Refusals worth retrying: 'out of resources' (0xA7xx) and no answer at all."""
        return {uid: r for uid, r in self.refused.items()
                if r[0] is None or (r[0] & 0xFF00) == 0xA700 or r[0] == -1}


def describe_destination(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def read_outgoing(paths: Iterable[Path]) -> list[OutgoingFile]:
    """The identity of each file to send, read from its header."""
    files = []
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        files.append(OutgoingFile(
            path=Path(path),
            sop_class_uid=str(dataset.file_meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(dataset.file_meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(dataset.file_meta.TransferSyntaxUID),
        ))
    return files


class _TLSContext(ssl.SSLContext):
    """An SSL context that remembers why a handshake failed: pynetdicom only logs it."""

    failure: OSError | None = None


class _RecordingSSLSocket(ssl.SSLSocket):
    def connect(self, address):  # noqa: ANN001 - ssl.SSLSocket's signature
        try:
            super().connect(address)
        except OSError as exc:
            self.context.failure = exc
            raise


_TLSContext.sslsocket_class = _RecordingSSLSocket


def tls_context(tls: DestinationTLS) -> _TLSContext:
    """The client context for one destination; raises DestinationUnavailable for unusable files."""
    context = _TLSContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195, as dcmtk's default profile
    try:
        if tls.ca_bundle:
            context.load_verify_locations(cafile=tls.ca_bundle)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.client_certificate:
            context.load_cert_chain(tls.client_certificate, tls.client_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise DestinationUnavailable(f"the destination's TLS settings cannot be used: {exc}") from exc
    return context


def _tls_failure(where: str, tls: DestinationTLS, context: _TLSContext) -> str:
    exc = context.failure
    if isinstance(exc, ssl.SSLCertVerificationError):
        against = tls.ca_bundle or "the system's trusted CAs"
        return (f"{where}: TLS handshake failed: the destination's certificate does not verify against "
                f"{against}: {exc.verify_message or exc.reason}")
    if exc is not None:
        return f"{where}: TLS handshake failed: {exc}"
    hint = "" if tls.client_certificate else " (if it requires a client certificate, set tls.clientCertificate)"
    return f"{where} did not accept an association over TLS{hint}"


def plan_contexts(files: list[OutgoingFile]) -> list[list[tuple[str, str]]]:
    """(SOP class, transfer syntax) pairs to propose, one presentation context each, grouped into
    associations of at most 128 contexts; all the contexts of a SOP class in one association."""
    syntaxes: dict[str, list[str]] = defaultdict(list)
    for item in files:
        for syntax in conversion_targets(item.transfer_syntax):
            if syntax not in syntaxes[item.sop_class_uid]:
                syntaxes[item.sop_class_uid].append(syntax)
    groups: list[list[tuple[str, str]]] = [[]]
    for sop_class in sorted(syntaxes):
        contexts = [(sop_class, syntax) for syntax in syntaxes[sop_class]]
        if len(groups[-1]) + len(contexts) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(contexts)
    return groups


def _not_sendable(item: OutgoingFile) -> str:
    offered = ", ".join(pydicom.uid.UID(ts).name for ts in conversion_targets(item.transfer_syntax))
    reason = f"destination accepted no presentation context for {item.sop_class_uid} in {offered}"
    syntax = pydicom.uid.UID(item.transfer_syntax)
    if syntax.is_compressed and not decoder_available(syntax):
        reason += f" (no decoder for {syntax.name} is installed to convert it)"
    return reason


def _associate(ae: AE, destination: Destination, where: str):
    tls = destination.tls
    context = tls_context(tls) if tls is not None else None
    tls_args = (context, tls.server_name or destination.host) if tls is not None else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[NODELAY_HANDLER], tls_args=tls_args)
    except OSError as exc:  # e.g. an unresolvable host name
        raise DestinationUnavailable(f"{where}: {exc}") from exc
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        return assoc  # it answered, and refused everything offered: a lasting refusal, not an outage
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DestinationUnavailable(f"{where} rejected the association")
        if tls is not None:
            raise DestinationUnavailable(_tls_failure(where, tls, context))
        raise DestinationUnavailable(f"{where} did not accept an association (down or unreachable)")
    return assoc


def _store(assoc, item: OutgoingFile, path: Path) -> tuple[int | None, str]:
    if not assoc.is_established:
        return None, "association ended early"
    status = assoc.send_c_store(path)
    code = getattr(status, "Status", None)
    if code is None:
        return None, "no answer (timeout or abort)"
    return code, f"status 0x{code:04X}"


def send_files(destination: Destination, files: list[OutgoingFile], calling_ae_title: str,
               timeout: float = 60.0, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> DeliveryResult:
    """One delivery attempt; raises DestinationUnavailable when no association could be made."""
    result = DeliveryResult()
    if not files:
        return result
    where = describe_destination(destination)
    for group in plan_contexts(files):
        classes = {sop_class for sop_class, _ in group}
        group_files = [item for item in files if item.sop_class_uid in classes]
        ae = AE(ae_title=calling_ae_title)
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.requested_contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in group]
        assoc = _associate(ae, destination, where)
        accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts} \
            if assoc.is_established else set()
        try:
            with tempfile.TemporaryDirectory(prefix=".converted-", dir=group_files[0].path.parent) as scratch:
                for item in group_files:
                    _send_one(assoc, item, accepted, Path(scratch), where, max_decoded_bytes, result)
        finally:
            if assoc.is_established:
                assoc.release()
    return result


def _send_one(assoc, item: OutgoingFile, accepted: set[tuple[str, str]], scratch: Path, where: str,
              max_decoded_bytes: int, result: DeliveryResult) -> None:
    target = next((syntax for syntax in conversion_targets(item.transfer_syntax)
                   if (item.sop_class_uid, syntax) in accepted), None)
    if target is None:
        result.refused[item.sop_instance_uid] = (NOT_SENT, _not_sendable(item))
        return
    path = item.path
    if target != item.transfer_syntax:
        try:
            path = convert(item.path, target, scratch / f"{item.sop_instance_uid}.dcm", max_decoded_bytes).path
        except ConversionError as exc:
            result.refused[item.sop_instance_uid] = (
                NOT_SENT, f"cannot convert it from {pydicom.uid.UID(item.transfer_syntax).name} to "
                          f"{pydicom.uid.UID(target).name}, the syntax {where} accepted: {exc}")
            return
        log.info("converted prediction %s from %s to %s for %s", item.sop_instance_uid,
                 pydicom.uid.UID(item.transfer_syntax).name, pydicom.uid.UID(target).name, where)
    code, meaning = _store(assoc, item, path)
    if code is not None and (code == 0x0000 or (code & 0xF000) == 0xB000):  # success, or a warning
        result.accepted.append(item.sop_instance_uid)
    else:
        result.refused[item.sop_instance_uid] = (code, meaning)
