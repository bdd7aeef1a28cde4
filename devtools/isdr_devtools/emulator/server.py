"""The HTTP(S) side of the emulator: both InferenceServer protocols on one port.

Routes (see /work/shared/INFERENCE_SERVER_API.md for the protocols):

    POST   /api/tasks/?model_human_readable_id=M   v1 submit (multipart, file field zip_file)
    GET    /api/tasks/<uid>                        v1 poll
    DELETE /api/tasks/<uid>                        v1 delete
    POST   /api/tasks/?human_readable_id=M         v2 submit (multipart, file field tar_file)
    GET    /api/tasks/outputs/?uid=<uid>           v2 poll
    DELETE /api/tasks/?uid=<uid>                   v2 delete
    GET    /_emulator/stats                        counters and tasks, for tests
    POST   /_emulator/reset                        forget tasks and counters, re-arm --fail-submits
                                                   and --queue-down-for

Answers are the real releases' (tasks.py says which): v1 errors are {"detail": {"detail": "..."}},
v2 errors {"detail": "..."}, and every 500 is the bare text "Internal Server Error" of a server
that crashed on the request. v1 sends its output zip chunked, with no Content-Type and no
Content-Length; v2 its tar with both. Client mistakes that the API does not list (no multipart
body, missing file field) answer 422 like the real (FastAPI) server, an upload over
--max-upload-bytes 413.

One log line per request goes to stderr: client, method, path, status. Paths hold only model names
and task uids, never patient data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import multipart
from .behaviours import Delivery, behaviour_for, catalogue
from .body import BodyError, BodyReader, BodyTooLarge
from .config import EmulatorConfig
from .stats import Stats
from .tasks import V1, V2, StoreSettings, TaskStore
from .tls import ensure_tls_files, server_context

log = logging.getLogger("isdr_devtools.emulator")

_REASONS = {
    550: "Model Not Found",
    551: "Task Pending",
    552: "Task Failed",
    553: "Output Missing",
    554: "Task Not Found",
}
_FILE_FIELD = {V1: "zip_file", V2: "tar_file"}
_BLOCK = 1 << 16
_TLS_HANDSHAKE_TIMEOUT = 10.0
# A body the handler did not need (a GET with a body) is drained up to this size, else the
# connection is closed, so keep-alive framing stays correct.
_MAX_DRAIN = 1 << 20


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart on the same port while old sockets are in TIME_WAIT
    request_queue_size = 64

    def __init__(self, config: EmulatorConfig, store: TaskStore, stats: Stats, tls: ssl.SSLContext | None):
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self.config = config
        self.store = store
        self.stats = stats
        self.tls = tls
        super().__init__((config.host, config.port), Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def finish_request(self, request, client_address):
        if self.tls is None:
            return super().finish_request(request, client_address)
        # The handshake runs here, in the connection's own thread, not in the accept loop, so a
        # client that stalls (or refuses our certificate) holds up nobody else.
        request.settimeout(_TLS_HANDSHAKE_TIMEOUT)
        try:
            tls_socket = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            if reason == "UNEXPECTED_EOF_WHILE_READING":
                reason = "the client closed the connection (a port probe?)"
            log.info("%s TLS handshake failed: %s", client_address[0], reason)
            return
        try:
            self.RequestHandlerClass(tls_socket, client_address, self)
        finally:
            try:
                tls_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tls_socket.close()

    def handle_error(self, request, client_address):
        # A client that drops the connection mid-answer is normal; one line, not a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            log.info("%s connection error: %s", client_address[0], type(exc).__name__)
        else:
            log.exception("unexpected error serving %s", client_address[0])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the relay's session reuses connections
    server_version = "ISDR-InferenceServer-Emulator/1"
    timeout = 120  # idle keep-alive connections are closed after this
    server: EmulatorServer

    # --- plumbing ---

    def log_request(self, code="-", size="-"):
        status = code.value if hasattr(code, "value") else code
        log.info('%s "%s %s" %s', self.client_address[0], self.command, self.path, status)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.info("%s %s", self.client_address[0], format % args)

    def _send(self, code: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(code, _REASONS.get(code))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, payload) -> None:
        self._send(code, json.dumps(payload).encode(), "application/json")

    def _error(self, code: int, detail: str) -> None:
        self._json(code, {"detail": detail})

    def _answer_error(self, protocol: str, code: int, detail: str) -> None:
        """An error answer as the release of `protocol` gives it."""
        if code == 500:
            return self._send(500, b"Internal Server Error", "text/plain; charset=utf-8")
        if protocol == V1:
            return self._json(code, {"detail": {"detail": detail}})
        return self._error(code, detail)

    # --- output downloads ---

    def _send_output(self, answer) -> bool:
        """The output archive, as the task's release sends it, in the way its model asks for."""
        try:
            handle = open(answer.path, "rb")
        except FileNotFoundError:
            return False
        delivery = answer.delivery
        chunked = answer.task.protocol == V1 or delivery in (Delivery.GZIP_BOMB, Delivery.ENDLESS)
        with handle:
            self.send_response(200)
            if answer.content_type:
                self.send_header("Content-Type", answer.content_type)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(os.fstat(handle.fileno()).st_size))
                self.send_header("Content-Disposition", f'attachment; filename="{answer.path.name}"')
            if delivery is Delivery.GZIP_BOMB:
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            write = self._write_chunk if chunked else self.wfile.write
            if delivery is Delivery.GZIP_BOMB:
                self._write_gzip_bomb(handle.read(), write)
            elif delivery is Delivery.DRIP:
                self._write_drip(handle, write)
            else:
                while block := handle.read(1 << 20):
                    write(block)
            if delivery is Delivery.ENDLESS:
                zeros = bytes(_BLOCK)
                while True:  # until the client gives up (BrokenPipe ends the request)
                    write(zeros)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        return True

    def _write_chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _write_drip(self, handle, write) -> None:
        step = 0.1
        size = max(1, int(self.server.config.drip_rate * step))
        while data := handle.read(size):
            write(data)
            time.sleep(step)

    def _write_gzip_bomb(self, archive: bytes, write) -> None:
        """gzip of the archive padded with zeros to --bomb-bytes (tar takes zeros as its end)."""
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        write(compressor.compress(archive))
        remaining = max(0, self.server.config.bomb_bytes - len(archive))
        zeros = bytes(1 << 20)
        while remaining:
            count = min(remaining, len(zeros))
            write(compressor.compress(zeros[:count]))
            remaining -= count
        write(compressor.flush())

    def _body(self) -> BodyReader | None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        try:
            content_length = int(length) if length is not None else None
        except ValueError:
            content_length = None
        if not chunked and not content_length:
            return None
        return BodyReader(self.rfile, content_length, chunked, self.server.config.max_upload_bytes)

    def _drain_unused_body(self) -> None:
        body = self._body()
        if body is None:
            return
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= _MAX_DRAIN:
            try:
                body.drain()
                return
            except (BodyError, OSError):
                pass
        self.close_connection = True

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path
        try:
            if method != "POST":
                self._drain_unused_body()
            self._route(method, path, query)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:  # noqa: BLE001 - answer 500 and keep serving
            log.exception("emulator error on %s %s", method, path)
            self.close_connection = True
            self._error(500, "emulator error (see its log)")

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    # --- routes ---

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        if path == "/_emulator/stats" and method == "GET":
            return self._json(200, self._stats())
        if path == "/_emulator/reset" and method == "POST":
            self._drain_unused_body()
            self.server.store.reset()
            self.server.stats.reset()
            return self._json(200, {"reset": True})
        if path in ("/api/tasks/outputs/", "/api/tasks/outputs") and method == "GET":
            if self.server.config.redirect_polls_to:
                return self._redirect()
            return self._poll(V2, query.get("uid", ""))
        if path in ("/api/tasks/", "/api/tasks"):
            if method == "POST":
                return self._submit(query)
            if method == "DELETE":
                return self._delete(V2, query.get("uid", ""))
        elif path.startswith("/api/tasks/"):
            uid = path[len("/api/tasks/") :].strip("/")
            if uid and "/" not in uid:
                if method == "GET" and self.server.config.redirect_polls_to:
                    return self._redirect()
                if method == "GET":
                    return self._poll(V1, uid)
                if method == "DELETE":
                    return self._delete(V1, uid)
        self.close_connection = method == "POST"  # an unread upload may follow
        return self._error(404, f"no route for {method} {path}")

    def _stats(self) -> dict:
        return {**self.server.stats.as_dict(), "tasks": self.server.store.snapshot(), "models": catalogue()}

    def _redirect(self) -> None:
        """--redirect-polls-to: the same path and query on another server."""
        self.server.stats.polled(302)
        self.send_response(302)
        self.send_header("Location", self.server.config.redirect_polls_to.rstrip("/") + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _poll(self, protocol: str, uid: str) -> None:
        answer = self.server.store.poll(protocol, uid)
        self.server.stats.polled(answer.code)
        if answer.code == 200 and answer.path is not None:
            if self._send_output(answer):
                return
            # Deleted between the lookup and the open: as if it had never been there.
            answer = self.server.store.poll(protocol, uid)
        self._answer_error(protocol, answer.code, answer.detail)

    def _delete(self, protocol: str, uid: str) -> None:
        answer = self.server.store.delete(protocol, uid)
        self.server.stats.deleted(answer.code)
        if answer.code != 200 or answer.task is None:
            return self._answer_error(protocol, answer.code, answer.detail)
        return self._json(200, answer.task.describe(time.time()))

    def _submit(self, query: dict[str, str]) -> None:
        if "model_human_readable_id" in query:
            protocol, model = V1, query["model_human_readable_id"]
        elif "human_readable_id" in query:
            protocol, model = V2, query["human_readable_id"]
        else:
            self._reject_upload()
            return self._error(
                422, "query parameter model_human_readable_id (v1) or human_readable_id (v2) is required"
            )

        stats = self.server.stats
        if stats.take_injected_failure():
            self._reject_upload()
            return self._answer_error(protocol, 500, "emulated submit failure")
        behaviour = behaviour_for(model)
        if behaviour is None:
            stats.rejected()
            self._reject_upload()
            # v2 has no "model not found" code: it crashes, and no task is created.
            return self._answer_error(protocol, 550 if protocol == V1 else 500, f"model {model!r} not found")

        form = self._receive_form(protocol)
        if form is None:
            stats.rejected()
            return
        field_name = _FILE_FIELD[protocol]
        try:
            part = form.files.pop(field_name, None)
            if part is None:
                stats.rejected()
                return self._error(422, f"multipart file field {field_name!r} is required")
            store = self.server.store
            queue_down = protocol == V2 and time.time() < store.queue_up_at
            try:
                task = store.create(protocol, model, behaviour, part.path,
                                    hold_until=store.queue_up_at if queue_down else 0.0)
            except OSError as exc:
                stats.rejected()
                part.path.unlink(missing_ok=True)
                log.error("cannot store a task: %s", exc)
                return self._answer_error(protocol, 500, f"task could not be stored: {exc.strerror}")
        finally:
            form.discard()
        stats.accepted(model)
        if queue_down:
            # The 2.0 server stores the task, then retries handing it to its queue until the
            # queue is back, and only then answers: the client sees a submit that hangs.
            log.info("task %s stored; the queue is down, so the submit hangs for %.1fs",
                     task.uid, store.queue_up_at - time.time())
            time.sleep(max(0.0, store.queue_up_at - time.time()))
        if protocol == V1:
            return self._json(200, task.uid)  # a JSON string: the uid
        return self._json(200, task.describe(time.time()))

    def _reject_upload(self) -> None:
        """Read and discard the upload, so the client sees our answer rather than a reset."""
        try:
            body = self._body()
            if body is not None:
                body.drain()
            else:
                self.close_connection = True
        except (BodyError, OSError):
            self.close_connection = True

    def _receive_form(self, protocol: str) -> multipart.Form | None:
        """The parsed multipart body with file parts spooled to disk, or None after an error answer."""
        try:
            body = self._body()
        except BodyError as exc:
            self.close_connection = True
            self._error(411, str(exc))
            return None
        if body is None:
            self.close_connection = True
            self._error(422, f"a multipart/form-data body with the file field {_FILE_FIELD[protocol]!r} is required")
            return None
        try:
            boundary = multipart.boundary_of(self.headers.get("Content-Type"))
            form = multipart.parse_form(body, boundary, self.server.store.spool_dir)
        except BodyTooLarge as exc:
            self._close_after_drain(body)
            self._error(413, str(exc))
        except multipart.MultipartError as exc:
            self._close_after_drain(body)
            self._error(422, f"malformed multipart/form-data: {exc}")
        except BodyError as exc:
            self.close_connection = True
            self._error(400, str(exc))
        else:
            # The parser stops at the close delimiter; what follows (at least the final CRLF)
            # must be read too, or it would be taken for the next request on this connection.
            try:
                body.drain()
            except (BodyError, OSError):
                self.close_connection = True
            return form
        return None

    def _close_after_drain(self, body: BodyReader) -> None:
        try:
            body.drain()
        except (BodyError, OSError):
            pass
        self.close_connection = True


# --- running it -----------------------------------------------------------------------------


def _write_port_file(path: Path, port: int) -> None:
    """Written atomically: a test waiting for the file never reads a half-written number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{port}\n")
    os.replace(tmp, path)


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s emulator %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_server(config: EmulatorConfig, data_dir: Path) -> EmulatorServer:
    """A bound (not yet serving) emulator with its task store loaded from `data_dir`."""
    config.validate()
    tls = None
    if config.tls_dir is not None:
        extra = [*config.tls_names]
        if config.host not in ("", "0.0.0.0", "::"):
            extra.append(config.host)
        tls = server_context(ensure_tls_files(config.tls_dir, extra))
    store = TaskStore(
        StoreSettings(
            data_dir=data_dir,
            delay=config.delay,
            v1_register_delay=config.v1_register_delay,
            bomb_bytes=config.bomb_bytes,
            uid_prefix=config.uid_prefix,
            queue_down_for=config.queue_down_for,
        )
    )
    loaded = store.load()
    if loaded:
        log.info("picked up %d task(s) from %s", loaded, data_dir)
    try:
        return EmulatorServer(config, store, Stats(config.fail_submits), tls)
    except BaseException:
        store.close()
        raise


def serve(config: EmulatorConfig) -> int:
    """Run until SIGTERM or SIGINT; return the exit code."""
    _configure_logging()
    temporary = config.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="isdr-emulator-")) if temporary else Path(config.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = build_server(config, data_dir)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc.strerror or exc)
        return 1

    def stop(signum, _frame):
        raise SystemExit(0)

    # In the main thread only (signal's rule); serve() may also run in a test's thread.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    scheme = "https" if server.tls else "http"
    host = config.host if ":" not in config.host else f"[{config.host}]"
    log.info(
        "listening on %s://%s:%d (v1 tasks URL %s://%s:%d/api/tasks/, v2 base URL %s://%s:%d), data in %s",
        scheme, host, server.port, scheme, host, server.port, scheme, host, server.port, data_dir,
    )
    if config.tls_dir is not None:
        log.info("clients verify against %s", Path(config.tls_dir) / "ca.pem")
    if config.port_file is not None:
        _write_port_file(Path(config.port_file), server.port)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.store.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
        log.info("stopped")
    return 0
