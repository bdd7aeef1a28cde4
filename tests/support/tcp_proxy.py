"""A small threaded TCP proxy that a test can cut, to play an outage of whatever is behind it.

    proxy = TcpProxy("127.0.0.1", api_port).start()
    ... point a client at 127.0.0.1:proxy.port ...
    proxy.pause()            # connections refused, open ones cut (mode="refuse")
    proxy.pause("reset")     # connections accepted and closed at once (a server dying mid-request)
    proxy.resume()           # forwarding again, on the same port
    proxy.hold_answers_to(b"POST")  # HTTP: requests reach the server, their answers never come back
    proxy.stop()

Bytes are forwarded untouched (TLS passes through), so a client still sees the real server's
certificate: keep the host the certificate names (127.0.0.1) and change only the port.

With `resolve` (a callable returning (host, port), or None) the target is chosen per connection,
as kube-proxy picks an endpoint; None resets the connection (no endpoint to go to).
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from typing import Callable

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str | None, target_port: int | None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, resolve: Callable[[], tuple[str, int] | None] | None = None):
        self.target = (target_host, target_port)
        self.resolve = resolve
        self.listen_host = listen_host
        self.port = listen_port
        self.mode = "forward"  # forward | refuse | reset
        self.connections_accepted = 0
        self.held_methods: tuple[bytes, ...] = ()
        self.answers_held = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._acceptor: threading.Thread | None = None

    # --- control -------------------------------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._listen()
        self._acceptor = threading.Thread(target=self._accept_forever, name="tcp-proxy", daemon=True)
        self._acceptor.start()
        return self

    def pause(self, mode: str = "refuse") -> None:
        """Stop forwarding: "refuse" closes the listening socket (connection refused), "reset"
        accepts and closes every new connection. Either way open connections are cut."""
        if mode not in ("refuse", "reset"):
            raise ValueError(f"unknown pause mode {mode!r}")
        with self._lock:
            self.mode = mode
            if mode == "refuse" and self._listener is not None:
                _close(self._listener)
                self._listener = None
        self.cut_connections()

    def resume(self) -> None:
        with self._lock:
            self.mode = "forward"
            if self._listener is None:
                self._listen_locked()

    def hold_answers_to(self, *methods: bytes) -> None:
        """HTTP only: once a client sends a request with one of these methods (b"POST",
        b"DELETE"), the server's answer on that connection is swallowed: the server does the work,
        the client never hears of it (a lost answer, a hung request). No argument: forward all."""
        with self._lock:
            self.held_methods = tuple(methods)

    def cut_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._listener is not None:
                _close(self._listener)
                self._listener = None
        self.cut_connections()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals -----------------------------------------------------------------------------

    def _listen(self) -> None:
        with self._lock:
            self._listen_locked()

    def _listen_locked(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _accept_forever(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                self._stopped.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:  # closed by pause() or stop()
                continue
            client.settimeout(None)
            with self._lock:
                mode = self.mode
                self.connections_accepted += 1
            if mode != "forward":
                _close(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="tcp-proxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        target = self.resolve() if self.resolve is not None else self.target
        if target is None:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            if self.mode != "forward":
                _close(client)
                _close(upstream)
                return
            self._sockets.update((client, upstream))
        try:
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._sockets.discard(client)
                self._sockets.discard(upstream)
            _close(client)
            _close(upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        holding = False  # the answer to a request of a held method is being swallowed
        with selectors.DefaultSelector() as selector:
            selector.register(a, selectors.EVENT_READ)
            selector.register(b, selectors.EVENT_READ)
            while not self._stopped.is_set():
                try:
                    events = selector.select(timeout=0.5)
                except (OSError, ValueError):  # a socket was closed under us
                    return
                for key, _ in events:
                    source = key.fileobj
                    try:
                        data = source.recv(_CHUNK)
                    except OSError:
                        return
                    if not data:
                        return
                    if source is a:
                        with self._lock:
                            held = self.held_methods
                        # Requests on one HTTP connection follow each other, so a chunk that starts
                        # a request starts with its method.
                        if held and data.split(b" ", 1)[0] in held:
                            holding = True
                            with self._lock:
                                self.answers_held += 1
                    elif holding:
                        continue
                    try:
                        peers[source].sendall(data)
                    except OSError:
                        return
                if a.fileno() == -1 or b.fileno() == -1:
                    return


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST, as a connection to a Service without endpoints ends."""
    _close(sock, reset=True)


def _close(sock: socket.socket, reset: bool = False) -> None:
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
