"""The C-STORE SCP: accepts instances, makes them durable, then (only then) says "success".

The data path is the relay's own (relay.dicom.server: sockets, limits and TLS; acse:
negotiation; association: DIMSE; store: the dataset streamed to storage), built on pynetdicom's
PDU codecs. Each instance is stored as the DICOM file format: preamble, file meta, and the dataset
bytes exactly as the sender encoded them in the negotiated transfer syntax.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from relay import metrics
from relay.config import Settings
from relay.dicom.identity import InstanceIdentity
from relay.dicom.network import configure_pynetdicom_logging
from relay.dicom.server import Hooks, Server
from relay.dicom.store import (CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, INVALID_UID,
                               OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, UNDECODABLE, IncomingInstance,
                               StoredInstance)
from relay.storage.base import Storage

__all__ = ["Receiver", "ReceivedInstance", "InstanceSink", "ReceiverCounters",
           # the C-STORE statuses the receiver answers (README, "C-STORE answers")
           "SUCCESS", "OUT_OF_RESOURCES", "DATASET_DOES_NOT_MATCH_SOP_CLASS", "CANNOT_UNDERSTAND", "UNDECODABLE",
           "INVALID_UID", "PROCESSING_FAILURE"]
log = logging.getLogger("relay.receiver")


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


class ReceiverCounters:
    """What the receiver did since it started, in this process (tests, logs). Each counter is a
    Counter keyed by a short reason from a closed set (a status, a rejection reason, a context
    result), never by anything a peer sent. The Prometheus metrics (relay.metrics) report the
    same events: associations accepted and rejected and instances refused from here, instances
    stored through metrics.CountingSink."""

    NAMES = ("stored", "refused", "bytes", "associations_accepted", "associations_rejected",
             "associations_aborted", "connections_refused", "contexts_refused")

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {name: Counter() for name in self.NAMES}

    def add(self, name: str, key: str = "", amount: int = 1) -> None:
        with self._lock:
            self._counts[name][key] += amount

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: dict(counts) for name, counts in self._counts.items()}

    def total(self, name: str) -> int:
        with self._lock:
            return sum(self._counts[name].values())


class Receiver:
    def __init__(self, settings: Settings, storage: Storage, sink: InstanceSink):
        self.settings = settings
        self.storage = storage
        self.sink = sink
        self.counters = ReceiverCounters()
        self._server: Server | None = None

    # --- life cycle ---

    def start(self) -> None:
        configure_pynetdicom_logging(self.settings.pynetdicom_log_level)  # the sender still uses pynetdicom
        self._server = Server(self.settings, self.storage, Hooks(self._stored, self._association_ended, self._count))
        self._server.start()
        ports = ", ".join(f"{kind} {port}" for kind, port in self._server.ports.items())
        log.info("receiving as %s on %s (%s) into %s", self.settings.scp_ae_title, self.settings.scp_hostname,
                 ports, self.storage.describe())

    @property
    def port(self) -> int:
        """The plain DICOM port (the TLS port with SCP_TLS_ONLY)."""
        if self._server is None:
            return self.settings.scp_tls_port if self.settings.scp_tls_only else self.settings.scp_port
        return self._server.ports.get("plain") or self._server.ports["tls"]

    @property
    def tls_port(self) -> int | None:
        if self._server is None:
            return self.settings.scp_tls_port
        return self._server.ports.get("tls")

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Accept no new associations; give running ones `drain_timeout` seconds, then abort them."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(drain_timeout)

    @property
    def stored(self) -> int:
        return self.counters.total("stored")

    @property
    def refused(self) -> int:
        return self.counters.total("refused")

    # --- C-STORE ---

    def store(self, raw, transfer_syntax, affected_sop_class_uid, affected_sop_instance_uid,
              calling_ae_title) -> int:
        """Validate, store durably and register one instance whose dataset is complete in `raw`
        (the network path streams fragments through the same IncomingInstance); returns the status."""
        instance = IncomingInstance(self.storage, transfer_syntax, affected_sop_class_uid,
                                    affected_sop_instance_uid, calling_ae_title)
        instance.write(raw)
        status, stored = instance.finish()
        self._stored(status, stored, calling_ae_title)
        return status

    def _count(self, name: str, key: str = "", amount: int = 1) -> None:
        """A counter of ours, and the Prometheus metric that reports it (relay.metrics)."""
        self.counters.add(name, key, amount)
        if name == "associations_accepted":
            metrics.association_accepted()
        elif name == "associations_rejected":
            metrics.association_rejected(key)

    def _stored(self, status: int, stored: StoredInstance | None, calling_ae_title: str) -> None:
        if status != SUCCESS or stored is None:
            self.counters.add("refused", f"{status:#06x}")
            metrics.instance_refused(status)  # stored instances are counted by metrics.CountingSink
            return
        self.counters.add("stored")
        self.counters.add("bytes", amount=stored.size)
        key = stored.identity.series.instance_key(stored.identity.sop_instance_uid)
        instance = ReceivedInstance(identity=stored.identity, size=stored.size,
                                    calling_ae_title=calling_ae_title, received_at=time.time())
        try:
            self.sink.instance_stored(instance)
        except Exception:  # the instance is durable; whoever missed it finds it in storage
            log.exception("instance %s stored, but registering it failed", key)

    def _association_ended(self, calling_ae_title: str) -> None:
        try:
            self.sink.association_ended(calling_ae_title)
        except Exception:
            log.exception("association end handler failed")
