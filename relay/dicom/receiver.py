"""The C-STORE SCP: accepts instances, makes them durable, then (only then) says "success".

Each instance is stored as the DICOM file format: preamble, file meta, and the dataset bytes
exactly as the sender encoded them in the negotiated transfer syntax (no decoding of pixel data,
no re-encoding, compressed data stays compressed).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from relay import metrics
from relay.config import Settings
from relay.dicom.file_meta import file_header
from relay.dicom.identity import InstanceIdentity, UndecodableDataset, identify, parse_dataset
from relay.dicom.network import NODELAY_HANDLER, configure_pynetdicom_logging, set_poll_interval
from relay.storage.base import Storage, StorageError, StorageFull
from relay.uids import InvalidUID

log = logging.getLogger("relay.receiver")

# C-STORE statuses (PS3.4 B.2.3 and the general statuses of PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # + a low byte saying which check failed
UNDECODABLE = CANNOT_UNDERSTAND | 0x210
INVALID_UID = CANNOT_UNDERSTAND | 0x220
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ: rejected-permanent (1), by the service user (1), reasons of PS3.8 9.3.4.
_REJECT_PERMANENT, _SERVICE_USER = 0x01, 0x01
_NO_REASON, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x03


@dataclass(frozen=True)
class ReceivedInstance:
    identity: InstanceIdentity
    size: int
    calling_ae_title: str
    received_at: float


class InstanceSink(Protocol):
    """Who is told about instances once they are durable (the series registry, a publisher)."""

    def instance_stored(self, instance: ReceivedInstance) -> None: ...

    def association_ended(self, calling_ae_title: str) -> None: ...


class Receiver:
    def __init__(self, settings: Settings, storage: Storage, sink: InstanceSink):
        self.settings = settings
        self.storage = storage
        self.sink = sink
        self._server = None
        self._counts_lock = threading.Lock()
        self.stored = 0
        self.refused = 0

    # --- life cycle ---

    def build_ae(self) -> AE:
        configure_pynetdicom_logging(self.settings.pynetdicom_log_level)
        ae = AE(ae_title=self.settings.scp_ae_title)
        ae.require_called_aet = True  # associations to another AE title are rejected
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.maximum_associations = 32
        ae.network_timeout = 120
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        ae = self.build_ae()
        handlers = [
            NODELAY_HANDLER,
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, lambda _event: metrics.association_accepted()),
            (evt.EVT_REJECTED, _count_rejection),  # pynetdicom's own rejections (called AE, limit)
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
        ]
        self._server = ae.start_server(
            (self.settings.scp_hostname, self.settings.scp_port),
            block=False,
            evt_handlers=handlers,
        )
        log.info(
            "receiving as %s on %s:%s into %s",
            self.settings.scp_ae_title,
            self.settings.scp_hostname,
            self.port,
            self.storage.describe(),
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.scp_port
        return self._server.server_address[1]

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Accept no new associations; give running ones `drain_timeout` seconds, then abort them."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            _drain(server, drain_timeout)

    def _on_connection(self, event) -> None:
        set_poll_interval(event.assoc, self.settings.scp_poll_interval)

    # --- access control ---

    def _on_requested(self, event) -> None:
        # The A-ASSOCIATE-RQ has been received but not negotiated yet: read it from the request.
        raw = event.assoc.requestor.primitive.calling_ae_title
        calling = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip()
        address = event.assoc.requestor.address
        allowed_aes = self.settings.allowed_calling_ae_titles
        allowed_addresses = self.settings.allowed_peer_addresses
        if allowed_aes and calling not in allowed_aes:
            log.warning("rejected association from %s at %s: calling AE title not allowed", calling, address)
            metrics.association_rejected(metrics.REJECT_CALLING_AE_TITLE)
            event.assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
        elif allowed_addresses and address not in allowed_addresses:
            log.warning("rejected association from %s at %s: address not allowed", calling, address)
            metrics.association_rejected(metrics.REJECT_ADDRESS)
            event.assoc.acse.send_reject(_REJECT_PERMANENT, _SERVICE_USER, _NO_REASON)

    # --- C-STORE ---

    def _on_c_store(self, event) -> int:
        status = self.store(
            raw=event.request.DataSet.getbuffer(),
            transfer_syntax=str(event.context.transfer_syntax),
            affected_sop_class_uid=str(event.request.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=str(event.request.AffectedSOPInstanceUID or ""),
            calling_ae_title=event.assoc.requestor.ae_title.strip(),
        )
        with self._counts_lock:
            if status == SUCCESS:
                self.stored += 1
            else:
                self.refused += 1
                metrics.instance_refused(status)
        return status

    def store(self, raw, transfer_syntax, affected_sop_class_uid, affected_sop_instance_uid,
              calling_ae_title) -> int:
        """Validate, store durably and register one instance; returns the C-STORE status."""
        peer = calling_ae_title or "?"
        try:
            dataset = parse_dataset(raw, transfer_syntax)
            identity = identify(dataset)
        except UndecodableDataset as exc:
            log.warning("refused an instance from %s: %s", peer, exc)
            return UNDECODABLE
        except InvalidUID as exc:
            log.warning("refused an instance from %s: %s", peer, exc)
            return INVALID_UID
        if identity.series.sop_class_uid != affected_sop_class_uid:
            log.warning("refused an instance from %s: dataset SOP class %s, request says %s",
                        peer, identity.series.sop_class_uid, affected_sop_class_uid[:64])
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        if identity.sop_instance_uid != affected_sop_instance_uid:
            log.warning("refused an instance from %s: dataset SOP instance UID differs from the request's",
                        peer)
            return INVALID_UID

        header = file_header(identity.series.sop_class_uid, identity.sop_instance_uid,
                             transfer_syntax, calling_ae_title)
        key = identity.series.instance_key(identity.sop_instance_uid)
        try:
            # Same SOP Instance UID, same key: a re-sent instance replaces itself, never duplicates.
            self.storage.put(key, (header, raw))
        except StorageFull as exc:
            log.error("refused an instance from %s: storage full: %s", peer, exc)
            return OUT_OF_RESOURCES
        except StorageError as exc:
            log.error("refused an instance from %s: storage failed: %s", peer, exc)
            return PROCESSING_FAILURE

        instance = ReceivedInstance(
            identity=identity,
            size=len(header) + len(raw),
            calling_ae_title=calling_ae_title,
            received_at=time.time(),
        )
        try:
            self.sink.instance_stored(instance)
        except Exception:  # the instance is durable; whoever missed it finds it in storage
            log.exception("instance %s stored, but registering it failed", key)
        return SUCCESS

    def _on_association_end(self, event) -> None:
        try:
            self.sink.association_ended(event.assoc.requestor.ae_title.strip())
        except Exception:
            log.exception("association end handler failed")


def _count_rejection(event) -> None:
    rejection = event.assoc.acceptor.primitive  # the A-ASSOCIATE-RJ pynetdicom sent
    metrics.association_rejected(metrics.reject_reason(rejection.result_source, rejection.diagnostic))


def _drain(server, timeout: float) -> None:
    """Let associations that are still running finish, so that their series get the final flush.

    Only established associations count: a bare TCP connection (a probe, a port scan) also gets an
    acceptor thread, which waits for an A-ASSOCIATE-RQ that never comes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            running = [a for a in server.active_associations if a.is_alive() and a.is_established]
        except Exception:  # noqa: BLE001 - pynetdicom internals; draining is best effort
            return
        if not running:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    # Abort the rest: an instance acknowledged after the final flush would never be published.
    log.warning("aborting %d associations still running after %.0fs (their senders resend what was not "
                "acknowledged)", len(running), timeout)
    for association in running:
        try:
            association.abort()
        except Exception:  # noqa: BLE001 - best effort
            pass
    for association in running:
        association.join(timeout=5)  # its last instance_stored has run before the final flush
