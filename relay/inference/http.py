"""HTTP plumbing shared by the v1 and v2 clients: one requests.Session, bounded requests, and the
mapping of transport failures and status codes onto the client's exceptions.

The two protocol generations differ only in URLs, field names and what a few status codes mean;
everything else (TLS, timeouts, streaming, error messages) lives here. What a server sends is
bounded here, in one place: every request has a total deadline (deadline.py), bodies are read
only so far (error answers), or counted as they are written, decoded (downloads), and no
request follows a redirect.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode

import requests
import urllib3

from .base import (
    MAX_ERROR_BODY_BYTES,
    ClientSettings,
    InferenceError,
    PollResult,
    ServerUnavailable,
    SubmitOutcomeUnknown,
    SubmitRejected,
    parse_task_uid,
    printable,
    redact_url,
    server_message,
    truncate,
)
from .deadline import DeadlineAdapter, RequestDeadline

log = logging.getLogger(__name__)

# Status codes the InferenceServer uses for its own answers (model not found, pending, failed,
# output missing, not found). They are deliberate answers, not signs of an overloaded server.
APPLICATION_CODES = frozenset({550, 551, 552, 553, 554})
_CHUNK = 1024 * 1024
_MAX_SUBMIT_ANSWER_BYTES = 1024 * 1024


class TlsVerificationFailed(ServerUnavailable):
    """The server's certificate did not verify against the CA bundle (check CERT_FILE)."""


def is_transient(status: int) -> bool:
    """Worth retrying later: 408/429, and 5xx other than the server's application answers."""
    return status in (408, 429) or (500 <= status <= 599 and status not in APPLICATION_CODES)


def is_redirect(status: int) -> bool:
    return 300 <= status <= 399


def poll_state(status: int) -> str:
    """The poll state of an HTTP status as both generations use it (v2 adds its 500, see v2.py)."""
    if is_redirect(status):
        return "failed"  # never followed (see _redirect_refused); asking again will not change it
    return {200: "ready", 551: "pending", 552: "failed", 553: "failed", 554: "not_found"}.get(
        status, "error"
    )


_POLL_MEANING = {
    552: "task failed or was deleted",
    553: "task finished but its output is missing",
    554: "task not found",
    551: "task pending or running",
}


class MultipartFile:
    """A multipart/form-data body with one file field, read from disk while it is sent.

    requests' `files=` builds the whole body in memory; an input series can be hundreds of MB,
    and a task pod should not need that much RAM. requests streams any object with `read` and
    `__iter__`, and takes the Content-Length from `__len__`.
    """

    def __init__(self, field: str, path: Path, filename: str, content_type: str):
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode("ascii")
        self._tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._file = open(path, "rb")
        self._length = len(self._head) + os.fstat(self._file.fileno()).st_size + len(self._tail)
        self._stage = 0  # 0: head, 1: file, 2: tail, 3: done

    @property
    def sent_all(self) -> bool:
        """True once every byte was handed to the connection: the server may have all of it."""
        return self._stage == 3

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = _CHUNK if size is None or size < 0 else size
        out = bytearray()
        while len(out) < size and self._stage < 3:
            if self._stage == 0:
                out += self._head
                self._stage = 1
            elif self._stage == 1:
                data = self._file.read(size - len(out))
                if data:
                    out += data
                else:
                    self._stage = 2
            else:
                out += self._tail
                self._stage = 3
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(_CHUNK):
            yield chunk

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _connection_never_made(exc: requests.RequestException) -> bool:
    """True when the request certainly did not reach the server (refused, DNS, connect timeout)."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


_POOL_PREFIX = re.compile(r"^\w+\(host=[^)]*\): ")


def _innermost_reason(exc: requests.RequestException) -> str:
    """urllib3 wraps the cause ("Connection refused") in a long retry message; keep the cause."""
    reason = exc.args[0] if exc.args else exc
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason
    return _POOL_PREFIX.sub("", str(reason))  # "HTTPConnectionPool(host=..., port=...): " says nothing new


def _shown(url: str, params: dict[str, str] | None) -> str:
    return f"{url}?{urlencode(params)}" if params else url


class HttpTransport:
    """One server's HTTP session. TLS is verified against the CA bundle or the default store."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.session = requests.Session()
        adapter = DeadlineAdapter()
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # Never False: a path verifies against that bundle, True against requests' default store
        # (which REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE may point elsewhere). Passed with every
        # request rather than set as session.verify, because requests lets those environment
        # variables override a session's verify (psf/requests#3829), which would silently ignore
        # CERT_FILE.
        self.verify: str | bool = settings.ca_bundle or True

    def close(self) -> None:
        self.session.close()

    # --- requests ---

    def _seconds(self, timeout: float, transfer_bytes: int) -> float:
        """A request's total deadline: its per-operation timeout plus its bytes at the slowest rate."""
        return timeout + transfer_bytes / self.settings.min_transfer_rate

    @contextmanager
    def _exchange(
        self, method: str, url: str, *, timeout: float, seconds: float, params=None, **kwargs
    ) -> Iterator[tuple[requests.Response, RequestDeadline]]:
        """One request under a total deadline of `seconds`, streamed, never redirected.

        Transport failures, while sending or while the caller reads the body inside the `with`,
        come out as ServerUnavailable naming the request.
        """
        shown = _shown(url, params)
        with RequestDeadline(seconds) as deadline:
            try:
                response = self.session.request(
                    method, url, params=params, timeout=min(timeout, max(seconds, 0.001)), stream=True,
                    verify=self.verify, allow_redirects=False, **kwargs,
                )
            except requests.RequestException as exc:
                raise self._unavailable(method, shown, exc, deadline) from exc
            with response:
                try:
                    yield response, deadline
                except requests.RequestException as exc:
                    raise self._unavailable(method, shown, exc, deadline) from exc

    def _unavailable(
        self, method: str, url: str, exc: requests.RequestException, deadline: RequestDeadline
    ) -> ServerUnavailable:
        where = f"{method} {redact_url(url)}"
        reached = not _connection_never_made(exc)
        if deadline.expired:
            return self._too_slow(where, deadline, reached)
        if isinstance(exc, requests.exceptions.SSLError):
            bundle = self.settings.ca_bundle or "the default CA store"
            return TlsVerificationFailed(
                f"{where}: TLS handshake or verification against {bundle} failed: "
                f"{truncate(_innermost_reason(exc), 300)}"
            )
        return ServerUnavailable(
            f"{where}: {type(exc).__name__}: {truncate(_innermost_reason(exc), 300)}",
            maybe_accepted=reached,
        )

    @staticmethod
    def _too_slow(where: str, deadline: RequestDeadline, reached: bool = True) -> ServerUnavailable:
        return ServerUnavailable(
            f"{where}: no complete answer within the request's deadline of {deadline.seconds:.0f}s "
            "(the server sends too slowly, or without end); broken off",
            maybe_accepted=reached,
        )

    @staticmethod
    def _read_limited(response: requests.Response, limit: int) -> bytes:
        """At most `limit` bytes of the body: error answers come from a server we do not control."""
        data = bytearray()
        try:
            for chunk in response.iter_content(64 * 1024):
                data += chunk
                if len(data) >= limit:
                    break
        except requests.RequestException:
            pass  # a partial message is better than none; the status code already tells what happened
        return bytes(data[:limit])

    def _describe(self, method: str, response: requests.Response, meaning: str = "") -> tuple[str, str]:
        """(full message naming URL and status, the server's own message)."""
        said = server_message(self._read_limited(response, MAX_ERROR_BODY_BYTES))
        text = f"{method} {redact_url(response.url)}: HTTP {response.status_code}"
        if meaning:
            text += f" ({meaning})"
        if said:
            text += f": {said}"
        return text, said

    @staticmethod
    def _redirect_refused(method: str, response: requests.Response) -> str:
        location = printable(redact_url(response.headers.get("Location", "")), 300) or "(no Location)"
        return (
            f"{method} {redact_url(response.url)}: HTTP {response.status_code} redirect to {location}, "
            "not followed: InferenceServer requests never follow redirects, so that a task's data "
            "goes only to the server its fingerprint names; put the right URL in the fingerprint"
        )

    # --- the operations ---

    def submit(
        self,
        url: str,
        params: dict[str, str],
        field: str,
        archive_path: Path,
        content_type: str,
        rejected: dict[int, str],
    ) -> str:
        """POST the archive as a multipart file field; return the task uid from the answer.

        `rejected` maps the protocol's own "will never work" status codes to their meaning.
        Raises SubmitOutcomeUnknown when the server may have the task but did not say so (see
        base.py), ServerUnavailable when it certainly does not have it, SubmitRejected when it
        refused it.
        """
        seconds = self._seconds(self.settings.post_timeout, archive_path.stat().st_size + _MAX_SUBMIT_ANSWER_BYTES)
        with MultipartFile(field, archive_path, Path(archive_path).name, content_type) as body:
            try:
                with self._exchange(
                    "POST", url, params=params, data=body, headers={"Content-Type": body.content_type},
                    timeout=self.settings.post_timeout, seconds=seconds,
                ) as (response, _):
                    return self._submit_answer(response, rejected)
            except SubmitOutcomeUnknown:
                raise
            except ServerUnavailable as exc:
                if not exc.maybe_accepted:
                    raise
                if not body.sent_all:
                    # The server never had the whole upload: it cannot have made a task of it.
                    raise ServerUnavailable(
                        f"{exc} (while uploading: the server cannot have the task)", exc.status_code
                    ) from exc
                raise SubmitOutcomeUnknown(
                    f"{exc}; the whole upload had been sent, so the server may have created the "
                    "task without saying so", exc.status_code,
                ) from exc

    def _submit_answer(self, response: requests.Response, rejected: dict[int, str]) -> str:
        status = response.status_code
        if 200 <= status < 300:
            answer = self._read_limited(response, _MAX_SUBMIT_ANSWER_BYTES)
            try:
                return parse_task_uid(answer.decode("utf-8", errors="replace"))
            except InferenceError as exc:
                # Accepted, but we cannot name the task: polling is impossible. Not retried,
                # since the server did take the task (a retry would run the model twice).
                raise SubmitRejected(
                    f"POST {redact_url(response.url)}: HTTP {status} but {exc}", status
                ) from exc
        if is_redirect(status):
            raise SubmitRejected(self._redirect_refused("POST", response), status)
        if status in rejected:
            message, said = self._describe("POST", response, rejected[status])
            raise SubmitRejected(message, status, said)
        if status == 504:
            # A gateway (the reverse proxy in front of the server) gave up waiting for the
            # server's answer; the server had the upload. 502 and 503 are retried instead: the
            # gateway could not reach the server at all (it is down or restarting), or the server
            # refused the work, and a crash in the middle of a v2 submit loses the task before
            # it reaches the queue, so a second submit does not run the model twice.
            message, _ = self._describe("POST", response, "a gateway gave up waiting for the server")
            raise SubmitOutcomeUnknown(message, status)
        if is_transient(status):
            message, _ = self._describe("POST", response)
            raise ServerUnavailable(message, status)
        message, said = self._describe("POST", response, "unexpected answer")
        raise SubmitRejected(message, status, said)

    def poll(
        self,
        url: str,
        params: dict[str, str] | None,
        dest: Path,
        time_limit: float | None = None,
        meanings: dict[int, tuple[str, str]] | None = None,
    ) -> PollResult:
        """One GET. On 200 the body (an archive) is streamed to `dest`, bounded in size and time.

        `meanings` maps a status code to the (state, meaning) a protocol gives it beyond the
        common ones; `time_limit` shortens the request's deadline (the task's own timeout).
        """
        seconds = self._seconds(self.settings.request_timeout, self.settings.max_download_bytes)
        if time_limit is not None:
            seconds = min(seconds, time_limit)
        with self._exchange(
            "GET", url, params=params, timeout=self.settings.request_timeout, seconds=seconds
        ) as (response, deadline):
            status = response.status_code
            if is_redirect(status):
                return PollResult("failed", None, self._redirect_refused("GET", response), status)
            state, meaning = (meanings or {}).get(status) or (poll_state(status), _POLL_MEANING.get(status, ""))
            if state == "ready":
                return self._download(response, dest, deadline)
            message, said = self._describe("GET", response, meaning)
            return PollResult(state, None, message, status, said)

    def _download(self, response: requests.Response, dest: Path, deadline: RequestDeadline) -> PollResult:
        limit = self.settings.max_download_bytes
        where = f"GET {redact_url(response.url)}"
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            return PollResult("failed", None, f"{where}: output of {declared} bytes exceeds the limit of {limit}", 200)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name, renamed when complete: a crash never leaves a file that
        # looks like a whole archive.
        part = dest.with_name(dest.name + ".part")
        written = 0
        try:
            with open(part, "wb") as out:
                # iter_content undoes any Content-Encoding, at most _CHUNK decoded bytes at a time
                # (urllib3 >= 2.7), so this counts, and bounds, the bytes really written.
                for chunk in response.iter_content(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        part.unlink()
                        return PollResult("failed", None, f"{where}: output exceeds the limit of {limit} bytes", 200)
                    out.write(chunk)
            if deadline.expired:  # a body without length, cut short by the deadline, looks whole
                raise self._too_slow(where, deadline)
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        log.debug("%s: %d bytes saved to %s", where, written, dest)
        return PollResult("ready", dest, "", 200)

    def answer_status(self, url: str, params: dict[str, str] | None) -> int:
        """The status code of a GET, without reading its body (to learn whether a task exists)."""
        seconds = self._seconds(self.settings.request_timeout, 0)
        with self._exchange("GET", url, params=params, timeout=self.settings.request_timeout,
                            seconds=seconds) as (response, _):
            return response.status_code

    def delete(self, url: str, params: dict[str, str] | None) -> None:
        """DELETE; 554 (not found) counts as done: the task is gone either way."""
        seconds = self._seconds(self.settings.request_timeout, MAX_ERROR_BODY_BYTES)
        with self._exchange("DELETE", url, params=params, timeout=self.settings.request_timeout,
                            seconds=seconds) as (response, _):
            status = response.status_code
            if 200 <= status < 300 or status == 554:
                return
            if is_redirect(status):
                raise InferenceError(self._redirect_refused("DELETE", response))
            message, _ = self._describe("DELETE", response)
            if is_transient(status):
                raise ServerUnavailable(message, status)
            raise InferenceError(message)


class PooledClient:
    """close() and `with` for a protocol client that keeps its HttpTransport in `self.http`."""

    http: HttpTransport

    def close(self) -> None:
        """Close pooled connections (a garbage-collected client closes them too, only later)."""
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
