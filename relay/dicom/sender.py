"""Delivery of predictions to a DICOM destination (C-STORE SCU).

Presentation contexts are built from the files actually sent: one per SOP class, offering the
transfer syntaxes the files are encoded in, so nothing is transcoded and nothing is proposed
that is not needed. A destination's status is kept per instance, so that a retry resends only
what it has not accepted yet.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pydicom
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import build_context

from relay.dicom.network import NODELAY_HANDLER
from relay.fingerprints.model import Destination

log = logging.getLogger("relay.sender")

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts in one association

# Send each file's dataset bytes as they are on disk instead of decoding and re-encoding them:
# faster, and what the destination gets is exactly what the model produced. This needs the
# accepted transfer syntax to be the file's own, which is what plan_contexts proposes.
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
    # SOP Instance UID -> (status, meaning); status None when no context was accepted for it
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


def plan_contexts(files: list[OutgoingFile]) -> list[list[tuple[str, list[str]]]]:
    """Group the files' (SOP class, transfer syntaxes) into associations of at most 128 contexts."""
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for item in files:
        syntaxes[item.sop_class_uid].add(item.transfer_syntax)
    contexts = [(sop_class, sorted(ts)) for sop_class, ts in sorted(syntaxes.items())]
    return [contexts[i:i + MAX_CONTEXTS] for i in range(0, len(contexts), MAX_CONTEXTS)] or [[]]


def send_files(destination: Destination, files: list[OutgoingFile], calling_ae_title: str,
               timeout: float = 60.0) -> DeliveryResult:
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
        ae.requested_contexts = [build_context(sop_class, ts) for sop_class, ts in group]
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                 evt_handlers=[NODELAY_HANDLER])
        except OSError as exc:  # e.g. an unresolvable host name
            raise DestinationUnavailable(f"{where}: {exc}") from exc
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # It answered, and refused everything offered: a lasting refusal, not an outage.
            accepted = set()
        elif not assoc.is_established:
            if assoc.is_rejected:
                raise DestinationUnavailable(f"{where} rejected the association")
            raise DestinationUnavailable(f"{where} did not accept an association (down or unreachable)")
        else:
            accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        try:
            for item in group_files:
                if (item.sop_class_uid, item.transfer_syntax) not in accepted:
                    result.refused[item.sop_instance_uid] = (
                        0x0122, "destination accepted no presentation context for "
                                f"{item.sop_class_uid} in {item.transfer_syntax}")
                    continue
                if not assoc.is_established:
                    result.refused[item.sop_instance_uid] = (None, "association ended early")
                    continue
                status = assoc.send_c_store(item.path)
                code = getattr(status, "Status", None)
                if code is None:
                    result.refused[item.sop_instance_uid] = (None, "no answer (timeout or abort)")
                elif code == 0x0000 or (code & 0xF000) == 0xB000:  # success, or a warning
                    result.accepted.append(item.sop_instance_uid)
                else:
                    result.refused[item.sop_instance_uid] = (code, f"status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
    return result
