"""The kubelet's log endpoint, for the node agent: what the API server proxies `kubectl logs` to.

kube-apiserver answers GET /api/v1/namespaces/NS/pods/POD/log by calling the pod's node at
https://<node InternalIP>:<status.daemonEndpoints.kubeletEndpoint.Port>/containerLogs/NS/POD/CONTAINER
with its kubelet client certificate (--kubelet-client-certificate) and passing the query on:
previous, follow, tailLines, limitBytes (sinceSeconds/sinceTime and timestamps are accepted and
ignored: the agent's log files carry no per-line times). Like kubelet, this server speaks TLS with a
serving certificate the API server verifies (--kubelet-certificate-authority), and only answers
clients that present a certificate signed by the cluster's CA.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(r"^/containerLogs/([a-z0-9.-]+)/([a-z0-9.-]+)/([a-z0-9.-]+)$")


def _select(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


class LogServer:
    """Serves /containerLogs from the agent's per-pod log folders.

    `log_runs(namespace, pod, container)` returns the container's log files, oldest run first;
    `running(namespace, pod, container)` tells whether its current run still goes on (for follow).
    """

    def __init__(self, log_runs: Callable[[str, str, str], list[Path]], running: Callable[[str, str, str], bool],
                 cert_file: str, key_file: str, client_ca_file: str, host: str = "127.0.0.1"):
        self.log_runs = log_runs
        self.running = running
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED  # the API server's kubelet client certificate
        server = self
        handler = type("Handler", (_Handler,), {"logs": server})
        self.httpd = ThreadingHTTPServer((host, 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="kubelet-logs", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    logs: LogServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args) -> None:  # quiet: the agent logs what matters
        pass

    def _plain(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self._plain(200, "ok")
        match = PATH.match(url.path)
        if not match:
            return self._plain(404, f"404 page not found: {url.path}")
        namespace, pod, container = match.groups()
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            tail = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError:
            return self._plain(400, "tailLines and limitBytes must be integers")
        previous = query.get("previous") == "true"
        follow = query.get("follow") == "true" and not previous
        runs = self.logs.log_runs(namespace, pod, container)
        if not runs:
            return self._plain(404, f'container "{container}" in pod "{pod}" is waiting to start or unknown')
        if previous:
            if len(runs) < 2:
                return self._plain(400, f'previous terminated container "{container}" in pod "{pod}" not found')
            return self._plain(200, _select(runs[-2].read_bytes(), tail, limit).decode(errors="replace"))
        data = _select(runs[-1].read_bytes(), tail, limit)
        if not follow:
            return self._plain(200, data.decode(errors="replace"))
        self._follow(runs[-1], namespace, pod, container, data, limit)

    def _follow(self, path: Path, namespace: str, pod: str, container: str, first: bytes, limit: int | None):
        """Chunked: what is there, then what the running container appends, until it ends."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        offset = path.stat().st_size

        def chunk(data: bytes) -> None:
            nonlocal sent
            if limit is not None:
                data = data[: max(0, limit - sent)]
            if data:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                sent += len(data)

        try:
            chunk(first)
            while not self.logs.stopping.is_set() and (limit is None or sent < limit):
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    more = handle.read()
                offset += len(more)
                chunk(more)
                if not more and not self.logs.running(namespace, pod, container):
                    break
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client (kubectl, through the API server) went away
