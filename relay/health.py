"""Readiness of the receiving processes (`isdr scp`, `isdr run`): GET /readyz on HEALTH_PORT.

A receiver is ready when it can do what it acknowledges: write an instance durably to its storage
and - in Kubernetes mode - publish series to the API server. Each of those is a named check, a
function that raises when the thing is unusable (`storage_writable` writes, fsyncs, reads back and
deletes a small probe object under the storage root). /readyz answers like the Kubernetes API
server's own /readyz: 200 `ok`, or 503 with one line per check (`[+]storage ok`,
`[-]kubernetes-api failed: ...`) and `readyz check failed`; `?verbose` lists the checks either way.

Requests never pile up work or threads on a storage that hangs: each check runs in at most one
thread at a time, its result is reused for MAX_AGE seconds, and a request waits at most WAIT
seconds for a running check before answering with the check's previous result - unless the check
has been running for STALL seconds or more, which counts as a failure ("no answer for 12s").

Why a port of its own and not /readyz beside /metrics: METRICS_PORT=0 turns metrics off, and
that must not take the readiness probe with it; probes come from the kubelet, scrapes from
Prometheus, and a network policy can tell them apart.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable
from urllib.parse import parse_qs, urlsplit

from relay.endpoint import HttpEndpoint

log = logging.getLogger("relay.health")

MAX_AGE = 1.0  # seconds a check's result is reused
WAIT = 2.0  # seconds a request waits for a running check (kubelet's timeoutSeconds is 1-3 s)
STALL = 10.0  # a check running this long has failed
PROBE_PREFIX = ".isdr-readiness"  # where storage_writable writes its probe objects


class NotReady(Exception):
    """A check's verdict: the thing it checks is unusable (the message says why)."""


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    message: str = ""

    def line(self) -> str:
        return f"[+]{self.name} ok" if self.ok else f"[-]{self.name} failed: {self.message}"


class _Check:
    """One named check, run in at most one thread at a time."""

    def __init__(self, name: str, function: Callable[[], None], clock: Callable[[], float]):
        self.name = name
        self.function = function
        self.clock = clock
        self._lock = threading.Lock()
        self._result: Verdict | None = None
        self._finished_at = float("-inf")
        self._running_since: float | None = None
        self._done = threading.Event()

    def verdict(self, max_age: float, wait: float, stall: float) -> Verdict:
        with self._lock:
            if self._running_since is None and self.clock() - self._finished_at >= max_age:
                self._running_since = self.clock()
                self._done = threading.Event()
                threading.Thread(target=self._run, name=f"readiness-{self.name}", daemon=True).start()
            done = self._done
        if wait > 0:
            done.wait(wait)
        with self._lock:
            if self._running_since is not None and self.clock() - self._running_since >= stall:
                return Verdict(self.name, False, f"no answer for {self.clock() - self._running_since:.0f}s")
            return self._result or Verdict(self.name, False, "not checked yet")

    def _run(self) -> None:
        try:
            self.function()
            result = Verdict(self.name, True)
        except Exception as exc:  # noqa: BLE001 - any failure of the check is its verdict
            message = str(exc) or type(exc).__name__
            result = Verdict(self.name, False, message if len(message) <= 500 else message[:500] + "...")
        with self._lock:
            self._result = result
            self._finished_at = self.clock()
            self._running_since = None
            self._done.set()


class Readiness:
    """The checks of one process; logs when one starts failing and when it recovers."""

    def __init__(self, checks: Iterable[tuple[str, Callable[[], None]]], *, max_age: float = MAX_AGE,
                 wait: float = WAIT, stall: float = STALL, clock: Callable[[], float] = time.monotonic):
        self.checks = [_Check(name, function, clock) for name, function in checks]
        self.max_age, self.wait, self.stall = max_age, wait, stall
        self._failing: dict[str, str] = {}
        self._stopping = False
        self._log_lock = threading.Lock()

    def shutting_down(self) -> None:
        """From now on not ready: the process stops (Services stop sending while it drains)."""
        self._stopping = True

    def verdicts(self) -> list[Verdict]:
        if self._stopping:
            return [Verdict("shutdown", False, "the process is stopping")]
        verdicts = [check.verdict(self.max_age, self.wait, self.stall) for check in self.checks]
        self._log_changes(verdicts)
        return verdicts

    def ready(self) -> bool:
        return all(v.ok for v in self.verdicts())

    def _log_changes(self, verdicts: list[Verdict]) -> None:
        with self._log_lock:
            for verdict in verdicts:
                if not verdict.ok and verdict.name not in self._failing:
                    log.warning("not ready: %s: %s", verdict.name, verdict.message)
                    self._failing[verdict.name] = verdict.message
                elif verdict.ok and verdict.name in self._failing:
                    del self._failing[verdict.name]
                    log.info("ready again: %s is usable", verdict.name)


def storage_writable(storage, name: str) -> Callable[[], None]:
    """A check that the storage takes a durable write the way the receiver writes an instance (an
    upload committed under its key: fsynced and renamed on a disk, spooled and sent to S3), reads
    it back and deletes it: `.isdr-readiness/<name>` (name: this process, e.g. its pod's name)."""
    key = f"{PROBE_PREFIX}/{re.sub(r'[^A-Za-z0-9._-]', '_', name).lstrip('.') or 'probe'}"
    payload = f"isdr readiness probe of {name}\n".encode()

    def check() -> None:
        try:
            upload = storage.open_upload()
            try:
                upload.write(payload)
                upload.commit(key)
            finally:
                upload.discard()  # nothing, once committed
            if storage.get(key) != payload:
                raise NotReady(f"{storage.describe()}: the probe object read back differs")
            storage.delete([key])
        except NotReady:
            raise
        except Exception as exc:  # noqa: BLE001 - every way the storage fails counts
            raise NotReady(f"cannot write to {storage.describe()}: {exc}") from exc

    return check


# --- the endpoint --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    readiness: Readiness  # set on the subclass made by serve()
    timeout = 10  # seconds: an idle or slow client is dropped
    server_version = "isdr-health"

    def log_message(self, *_args) -> None:  # probes every few seconds: no access log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        if url.path != "/readyz":
            self._answer(404, "not found: try /readyz\n")
            return
        verdicts = self.readiness.verdicts()
        ok = all(v.ok for v in verdicts)
        verbose = "verbose" in parse_qs(url.query, keep_blank_values=True)
        if ok and not verbose:
            self._answer(200, "ok\n")
            return
        lines = [v.line() for v in verdicts] + ["readyz check passed" if ok else "readyz check failed"]
        self._answer(200 if ok else 503, "\n".join(lines) + "\n")

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def serve(port: int, readiness: Readiness, host: str = "0.0.0.0") -> HttpEndpoint | None:
    """Serve /readyz at http://host:port; None when port is 0 (off) or cannot be bound (said in
    the log: the probe then fails, and Kubernetes keeps traffic away, which is the safe side)."""
    if not port:
        return None
    handler = type("ReadinessHandler", (_Handler,), {"readiness": readiness})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        log.error("cannot serve /readyz on %s:%d (%s)", host, port, exc)
        return None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="readiness", daemon=True)
    thread.start()
    log.info("serving readiness at http://%s:%d/readyz", host, port)
    return HttpEndpoint(server, thread)
