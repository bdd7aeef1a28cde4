"""HTTP plumbing shared by the v1 and v2 clients: one requests.Session, bounded reads, and the
mapping of transport failures and status codes onto the client's exceptions.

The two protocol generations differ only in URLs, field names and which status code means
"rejected" on submit; everything else (TLS, timeouts, streaming, error messages) lives here.
"""

from __future__ import annotations

import logging
import os
import uuid
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
    SubmitRejected,
    parse_task_uid,
    redact_url,
    server_message,
    truncate,
)

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


def poll_state(status: int) -> str:
    """The poll state of an HTTP status, identical in v1 and v2."""
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


def _innermost_reason(exc: requests.RequestException) -> str:
    """urllib3 wraps the cause ("Connection refused") in a long retry message; keep the cause."""
    reason = exc.args[0] if exc.args else exc
    while getattr(reason, "reason", None) is not None:
        reason = reason.reason
    return str(reason)


class HttpTransport:
    """One server's HTTP session. TLS is verified against the CA bundle or the default store."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.session = requests.Session()
        # Never False: a path verifies against that bundle, True against requests' default store
        # (which REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE may point elsewhere). Passed with every
        # request rather than set as session.verify, because requests lets those environment
        # variables override a session's verify (psf/requests#3829), which would silently ignore
        # CERT_FILE.
        self.verify: str | bool = settings.ca_bundle or True

    def close(self) -> None:
        self.session.close()

    # --- requests ---

    def _request(self, method: str, url: str, *, timeout: float, **kwargs) -> requests.Response:
        try:
            return self.session.request(
                method, url, timeout=timeout, stream=True, verify=self.verify, **kwargs
            )
        except requests.RequestException as exc:
            params = kwargs.get("params")
            shown = f"{url}?{urlencode(params)}" if params else url
            raise self._unavailable(method, shown, exc) from exc

    def _unavailable(self, method: str, url: str, exc: requests.RequestException) -> ServerUnavailable:
        where = f"{method} {redact_url(url)}"
        if isinstance(exc, requests.exceptions.SSLError):
            bundle = self.settings.ca_bundle or "the default CA store"
            return TlsVerificationFailed(
                f"{where}: TLS handshake or verification against {bundle} failed: "
                f"{truncate(_innermost_reason(exc), 300)}"
            )
        return ServerUnavailable(
            f"{where}: {type(exc).__name__}: {truncate(_innermost_reason(exc), 300)}",
            maybe_accepted=not _connection_never_made(exc),
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

    # --- the three operations ---

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
        """
        with MultipartFile(field, archive_path, Path(archive_path).name, content_type) as body:
            # No redirects: requests would turn a redirected POST into a GET without the archive.
            response = self._request(
                "POST",
                url,
                params=params,
                data=body,
                headers={"Content-Type": body.content_type},
                timeout=self.settings.post_timeout,
                allow_redirects=False,
            )
        with response:
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
            if status in rejected:
                message, said = self._describe("POST", response, rejected[status])
                raise SubmitRejected(message, status, said)
            if is_transient(status):
                message, _ = self._describe("POST", response)
                raise ServerUnavailable(message, status)
            message, said = self._describe("POST", response, "unexpected answer")
            raise SubmitRejected(message, status, said)

    def poll(self, url: str, params: dict[str, str] | None, dest: Path) -> PollResult:
        """One GET. On 200 the body (an archive) is streamed to `dest`, bounded in size."""
        response = self._request("GET", url, params=params, timeout=self.settings.request_timeout)
        with response:
            status = response.status_code
            state = poll_state(status)
            if state == "ready":
                return self._download(response, dest)
            message, said = self._describe("GET", response, _POLL_MEANING.get(status, ""))
            return PollResult(state, None, message, status, said)

    def _download(self, response: requests.Response, dest: Path) -> PollResult:
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
                # iter_content undoes any Content-Encoding, so this counts the bytes really written.
                for chunk in response.iter_content(_CHUNK):
                    written += len(chunk)
                    if written > limit:
                        part.unlink()
                        return PollResult("failed", None, f"{where}: output exceeds the limit of {limit} bytes", 200)
                    out.write(chunk)
            os.replace(part, dest)
        except requests.RequestException as exc:
            part.unlink(missing_ok=True)
            raise self._unavailable("GET", response.url, exc) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        log.debug("%s: %d bytes saved to %s", where, written, dest)
        return PollResult("ready", dest, "", 200)

    def delete(self, url: str, params: dict[str, str] | None) -> None:
        """DELETE; 554 (not found) counts as done: the task is gone either way."""
        response = self._request("DELETE", url, params=params, timeout=self.settings.request_timeout)
        with response:
            status = response.status_code
            if 200 <= status < 300 or status == 554:
                return
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
