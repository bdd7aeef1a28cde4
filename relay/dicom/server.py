"""The receiver's sockets: listening (plain and TLS ports), accepting within limits, and taking
each connection from its first byte to an established association, one thread per connection.

Limits are applied before anything is allocated for a peer: a total and a per-address number of
open connections (checked at accept), a deadline for the A-ASSOCIATE-RQ (a connection that says
nothing is closed), a bound on the request's size, a number of concurrent associations, and an
idle time-out once associated. So port scanners, broken devices and hostile peers cannot keep
scanners out, and memory per connection is bounded by SCP_MAX_PDU.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from typing import Callable

from relay import metrics
from relay.config import Settings
from relay.dicom.acse import (CALLED_AE_NOT_RECOGNIZED, CALLING_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED,
                              NO_REASON, REJECTED_PERMANENT, REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION,
                              SERVICE_USER, AssociationRequest, decode_request, encode_accept)
from relay.dicom.association import Association, AssociationEnded
from relay.dicom.conformance import CONTEXT_RESULTS, negotiate
from relay.dicom.pdu import (A_ASSOCIATE_RQ, ABORT_BY_PROVIDER, PDU_NAMES, REASON_NOT_SPECIFIED, UNEXPECTED_PDU,
                             PduError, PduReader, PeerClosed, a_abort, a_associate_rj)
from relay.dicom.tls import peer_subject, server_context

log = logging.getLogger("relay.receiver")
# An A-ASSOCIATE-RQ may be longer than SCP_MAX_PDU (which concerns P-DATA-TF): 128 presentation
# contexts with many transfer syntaxes each fit in 256 KiB.
REQUEST_LIMIT = 256 * 1024
_TLS_RECORD_HANDSHAKE = 0x16


class Hooks:
    """What the server tells the receiver."""

    def __init__(self, on_stored: Callable, on_association_end: Callable[[str], None],
                 count: Callable[[str, str], None]):
        self.on_stored = on_stored
        self.on_association_end = on_association_end
        self.count = count  # (counter name, key)


class Server:
    def __init__(self, settings: Settings, storage, hooks: Hooks):
        self.settings = settings
        self.storage = storage
        self.hooks = hooks
        self._tls = (server_context(settings.scp_tls_cert_file, settings.scp_tls_key_file, settings.scp_tls_ca_file)
                     if settings.scp_tls_port else None)
        self._listeners: dict[socket.socket, bool] = {}  # listening socket -> TLS
        self.ports: dict[str, int] = {}
        self._lock = threading.Lock()
        self._per_address: Counter[str] = Counter()
        self._open: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._associations: set[Association] = set()
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None

    # --- listening ------------------------------------------------------------------------

    def start(self) -> None:
        host = self.settings.scp_hostname
        if not self.settings.scp_tls_only:
            self.ports["plain"] = self._listen(host, self.settings.scp_port, tls=False)
        if self._tls is not None:
            self.ports["tls"] = self._listen(host, self.settings.scp_tls_port, tls=True)
        self._accept_thread = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._accept_thread.start()

    def _listen(self, host: str, port: int, tls: bool) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=256)
        sock.setblocking(False)
        self._listeners[sock] = tls
        return sock.getsockname()[1]

    def _accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self._listeners:
            selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _events in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept(key.fileobj, self._listeners[key.fileobj])
        finally:
            selector.close()

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of file descriptors, ...: keep serving those already connected
            log.error("accepting a connection failed: %s", exc)
            time.sleep(0.1)
            return
        peer = address[0]
        refusal = None
        with self._lock:
            if len(self._open) >= self.settings.scp_max_connections:
                refusal = f"{len(self._open)} connections are open (SCP_MAX_CONNECTIONS)"
            elif self._per_address[peer] >= self.settings.scp_max_connections_per_address:
                refusal = (f"{self._per_address[peer]} connections from this address are open "
                           "(SCP_MAX_CONNECTIONS_PER_ADDRESS)")
            else:
                self._per_address[peer] += 1
                connection = _Connection(sock)
                self._open.add(connection)
        if refusal:
            log.warning("refused a connection from %s: %s", peer, refusal)
            self.hooks.count("connections_refused", refusal.split("(")[-1].rstrip(")"))
            sock.close()
            return
        thread = threading.Thread(target=self._serve, args=(connection, peer, tls), name=f"dicom-{peer}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    # --- one connection -------------------------------------------------------------------

    def _serve(self, connection: "_Connection", peer: str, tls: bool) -> None:
        try:
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve_connection(connection, peer, tls)
        except Exception:  # noqa: BLE001 - one connection's bug must not end the server
            log.exception("connection from %s failed", peer)
        finally:
            try:
                connection.sock.close()
            except OSError:
                pass
            with self._lock:
                self._open.discard(connection)
                self._per_address[peer] -= 1
                if self._per_address[peer] <= 0:
                    del self._per_address[peer]
                self._threads.discard(threading.current_thread())

    def _serve_connection(self, connection: "_Connection", peer: str, tls: bool) -> None:
        sock = connection.sock
        timeout = self.settings.scp_request_timeout
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            self._no_request(peer)
            return
        except OSError:
            return
        if not first:
            log.debug("connection from %s closed without a word (a port probe)", peer)
            return
        subject = None
        if tls:
            if first[0] == A_ASSOCIATE_RQ:
                log.warning("a plain DICOM association from %s arrived on the TLS port %s: the sender must use TLS "
                            "(dcmtk: +tls) or the plain port %s", peer, self.ports.get("tls"),
                            self.ports.get("plain", "(none: SCP_TLS_ONLY)"))
                self.hooks.count("connections_refused", "plain on TLS port")
                return
            sock, subject = self._handshake(sock, peer, deadline)
            if sock is None:
                return
            connection.sock = sock
        elif first[0] == _TLS_RECORD_HANDSHAKE:
            log.warning("a TLS handshake on the plain DICOM port %s from %s: the sender uses TLS; point it to the "
                        "TLS port %s", self.ports.get("plain"), peer,
                        self.ports.get("tls", "(none configured: SCP_TLS_PORT)"))
            self.hooks.count("connections_refused", "TLS on plain port")
            return
        reader = PduReader(sock)
        try:
            pdu_type, body = reader.read(max(REQUEST_LIMIT, self.settings.max_pdu_size), deadline)
            if pdu_type != A_ASSOCIATE_RQ:
                raise PduError(f"{PDU_NAMES[pdu_type]} before any association", UNEXPECTED_PDU)
            request = decode_request(body)
        except socket.timeout:
            self._no_request(peer)
            return
        except PeerClosed:
            return
        except OSError as exc:  # a reset, a TLS record error
            log.warning("connection from %s failed before an association: %s", peer, exc)
            return
        except PduError as exc:
            log.warning("connection from %s aborted before an association: %s", peer, exc)
            self.hooks.count("connections_refused", "protocol error")
            _send_quietly(sock, a_abort(ABORT_BY_PROVIDER, exc.reason))
            return
        self._associate(sock, reader, peer, request, subject)

    def _handshake(self, sock: socket.socket, peer: str, deadline: float):
        assert self._tls is not None
        wrapped = None
        try:
            wrapped = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            wrapped.settimeout(max(0.01, deadline - time.monotonic()))
            wrapped.do_handshake()
            return wrapped, peer_subject(wrapped)
        except socket.timeout:
            self._no_request(peer)
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            self.hooks.count("connections_refused", "TLS handshake failed")
        if wrapped is not None:
            wrapped.close()
        return None, None

    def _no_request(self, peer: str) -> None:
        log.warning("connection from %s sent no association request within %gs (SCP_REQUEST_TIMEOUT); closed",
                    peer, self.settings.scp_request_timeout)
        self.hooks.count("connections_refused", "no association request")

    # --- association ----------------------------------------------------------------------

    def _rejection(self, request: AssociationRequest, peer: str):
        """(result, source, reason, counter key: one of metrics.REJECT_REASONS, log text) when the
        request is not accepted."""
        settings = self.settings
        if request.called_ae_title != settings.scp_ae_title:
            return (REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED, metrics.REJECT_CALLED_AE_TITLE,
                    f"called AE title {request.called_ae_title!r} is not {settings.scp_ae_title!r}")
        if settings.allowed_calling_ae_titles and request.calling_ae_title not in settings.allowed_calling_ae_titles:
            return (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED, metrics.REJECT_CALLING_AE_TITLE,
                    "calling AE title not allowed (SCP_ALLOWED_AE_TITLES)")
        if settings.allowed_peer_addresses and peer not in settings.allowed_peer_addresses:
            return (REJECTED_PERMANENT, SERVICE_USER, NO_REASON, metrics.REJECT_ADDRESS,
                    "address not allowed (SCP_ALLOWED_ADDRESSES)")
        return None

    def _associate(self, sock, reader: PduReader, peer: str, request: AssociationRequest, subject) -> None:
        calling = request.calling_ae_title
        rejection = self._rejection(request, peer)
        with self._lock:
            if rejection is None and len(self._associations) >= self.settings.scp_max_associations:
                rejection = (REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                             metrics.REJECT_ASSOCIATION_LIMIT, f"{len(self._associations)} associations are running, the "
                             "limit (SCP_MAX_ASSOCIATIONS)")
            association = None
            if rejection is None and not self._stopping:
                results = negotiate(request.contexts, self.settings.scp_accept_unknown_sop_classes)
                association = Association(sock, reader, f"{calling} at {peer}", calling, results,
                                          self.settings.max_pdu_size, self.storage, self.hooks.on_stored)
                self._associations.add(association)
        if rejection is not None or association is None:
            result, source, reason, key, text = rejection or (
                REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED, metrics.REJECT_OTHER,
                "the relay is stopping")
            log.warning("rejected association from %s at %s: %s", calling, peer, text)
            self.hooks.count("associations_rejected", key)
            _send_quietly(sock, a_associate_rj(result, source, reason))
            return
        try:
            for result in results:
                if not result.accepted:
                    log.warning("refused presentation context %d from %s at %s: %s: %s", result.context_id,
                                calling, peer, result.abstract_syntax[:64], result.reason)
                    self.hooks.count("contexts_refused", CONTEXT_RESULTS.get(result.result, str(result.result)))
            sock.sendall(encode_accept(request, results, self.settings.max_pdu_size))
            self.hooks.count("associations_accepted", "tls" if self._is_tls(sock) else "plain")
            if self._is_tls(sock):
                log.info("TLS association from %s at %s, client certificate %s", calling, peer,
                         subject or "(none requested)")
            else:
                log.debug("association from %s at %s", calling, peer)
            sock.settimeout(self.settings.scp_idle_timeout)
            self._run(association)
        except OSError as exc:
            log.warning("association from %s at %s failed: %s", calling, peer, exc)
        finally:
            with self._lock:
                self._associations.discard(association)
            self.hooks.on_association_end(calling)

    @staticmethod
    def _is_tls(sock) -> bool:
        return isinstance(sock, ssl.SSLSocket)

    def _run(self, association: Association) -> None:
        peer = association.peer
        try:
            how = association.run()
            log.debug("association from %s %s", peer, how)
            return
        except socket.timeout:
            log.warning("association from %s idle for %gs (SCP_IDLE_TIMEOUT); aborted", peer,
                        self.settings.scp_idle_timeout)
            association.abort(REASON_NOT_SPECIFIED)
            reason = "idle"
        except AssociationEnded as exc:
            log.warning("association from %s %s", peer, exc)
            reason = "aborted by the peer"
        except PeerClosed:
            if self._stopping:
                return
            log.warning("association from %s: the connection closed without a release", peer)
            reason = "closed without release"
        except PduError as exc:
            log.warning("association from %s aborted: %s", peer, exc)
            association.abort(exc.reason)
            reason = "protocol error"
        self.hooks.count("associations_aborted", reason)

    # --- stopping -------------------------------------------------------------------------

    @property
    def running_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def stop(self, drain_timeout: float) -> None:
        """Accept no new connections; let running associations finish for `drain_timeout` seconds,
        then cut them (their senders resend what was not acknowledged)."""
        self._stopping = True
        _send_quietly(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        for listener in self._listeners:
            listener.close()
        deadline = time.monotonic() + drain_timeout
        while self.running_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            running, sockets, threads = (len(self._associations), [c.sock for c in self._open],
                                         list(self._threads))
        if running:
            log.warning("aborting %d associations still running after %.0fs (their senders resend what was not "
                        "acknowledged)", running, drain_timeout)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5)  # an association's last instance_stored has run when this returns
        self._wake_r.close()
        self._wake_w.close()


class _Connection:
    """An accepted socket, replaced by its TLS wrapper once the handshake is done."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
