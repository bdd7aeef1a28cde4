"""A total deadline for one HTTP request, whatever the server sends.

requests' timeouts bound each socket operation, not a request: a server that sends a byte every
few seconds (a slow drip), or a body without end, keeps a request alive for as long as it likes.
Every InferenceServer request therefore runs under a RequestDeadline: a timer that, when the
time is up, shuts the request's socket down, so that whatever is blocked on it (sending the
upload, waiting for the headers, reading the body) returns at once. `expired` then tells the
caller why the request broke off, even where the broken-off body looked complete.

The socket is found through the connection classes of DeadlineAdapter: a connection registers
itself, when it connects and when it sends a request, with the deadline of the request running
in the current context. The TLS handshake is the one step bounded only by the connect timeout
(the socket is handed to the TLS layer during it).
"""

from __future__ import annotations

import contextvars
import socket
import threading

import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_CURRENT: contextvars.ContextVar[RequestDeadline | None] = contextvars.ContextVar(
    "isdr_request_deadline", default=None
)


class RequestDeadline:
    """`with RequestDeadline(seconds):` around one request, its body included."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._connection: HTTPConnection | None = None
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._token: contextvars.Token | None = None

    def __enter__(self) -> RequestDeadline:
        self._token = _CURRENT.set(self)
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()
        with self._lock:
            self._connection = None
        _CURRENT.reset(self._token)

    def watch(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connection = connection
            expired = self.expired
        if expired:
            _shut_down(connection)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            connection = self._connection
        if connection is not None:
            _shut_down(connection)


def _shut_down(connection: HTTPConnection) -> None:
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        # socket.socket's own shutdown, for an SSLSocket too: it acts on the file descriptor,
        # which wakes a read or write blocked in another thread; no TLS close from this thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _register(connection: HTTPConnection) -> None:
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.watch(connection)


class _Watched:
    """Mixed into urllib3's connections: registers with the current request's deadline."""

    def connect(self) -> None:
        _register(self)
        super().connect()

    def request(self, *args, **kwargs) -> None:
        _register(self)
        super().request(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with connections that a RequestDeadline can cut."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS brings connection classes of its own
            manager.pool_classes_by_scheme = _POOLS
        return manager
