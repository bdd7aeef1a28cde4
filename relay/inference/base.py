"""What every InferenceServer client shares: settings, errors, poll results, and small pure rules.

Everything a server sends (task uids, error bodies) is untrusted input from the network; the
helpers here validate or bound it before it reaches a URL, a file name or a log line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

# An output archive is refused when its HTTP body is larger than this (the extracted size is
# limited separately by safe_extract).
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3
MAX_MESSAGE_CHARS = 500
# Bodies of error answers are read only this far: a hostile or broken server could stream forever.
MAX_ERROR_BODY_BYTES = 64 * 1024

# A task uid names a URL path segment (v1) and a file on disk: letters, digits, '.', '_', '-'.
# The first character must be a letter or digit, which rules out '.', '..' (URL-join would climb
# out of the tasks URL) and names that look like options or hidden files.
_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ClientSettings:
    # PEM file (may hold several certificates); None: requests' default CA store. TLS is always
    # verified: against this bundle, or the default store. There is no way to turn it off.
    ca_bundle: str | None = None
    post_timeout: float = 60.0  # POST_TIMEOUT: the submit request
    request_timeout: float = 30.0  # polls and deletes
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES


class InferenceError(Exception):
    """Base of everything the InferenceServer client raises."""


class TaskFailed(InferenceError):
    """The task will not produce outputs (552/553, 554 after the grace period, timeout): permanent."""

    def __init__(self, message: str, status_code: int | None = None, server_message: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message


class SubmitRejected(InferenceError):
    """The server refused the submit (unknown model, cannot store, other 4xx): retrying won't help."""

    def __init__(self, message: str, status_code: int | None = None, server_message: str = ""):
        super().__init__(message)
        self.status_code = status_code
        self.server_message = server_message


class ServerUnavailable(InferenceError):
    """Connection refused/reset, timeout, or a 5xx answer: transient, try again later.

    `maybe_accepted` is True when the request may have reached the server before the failure
    (e.g. the response timed out): for a submit that means the task may exist on the server.
    """

    def __init__(self, message: str, status_code: int | None = None, maybe_accepted: bool = False):
        super().__init__(message)
        self.status_code = status_code
        self.maybe_accepted = maybe_accepted


PollState = Literal["pending", "ready", "failed", "not_found", "error"]


@dataclass(frozen=True)
class PollResult:
    state: PollState
    archive_path: Path | None = None  # set when state == 'ready'
    message: str = ""  # for people: names the URL, the status code and what the server said
    status_code: int = 0  # 0: no HTTP answer
    server_message: str = ""  # what the server said, alone (truncated)


class InferenceClient(Protocol):
    """One InferenceServer, one protocol generation. v1 and v2 implement this."""

    protocol: str

    def submit(self, archive_path: Path, model: str) -> str: ...

    def poll(self, uid: str) -> PollResult: ...

    def delete(self, uid: str) -> None: ...

    def archive_format(self) -> str: ...


class InvalidTaskUid(InferenceError):
    """The server answered a submit with something that is not a usable task uid."""


def validate_uid(uid) -> str:
    if not isinstance(uid, str) or _SAFE_UID.fullmatch(uid) is None:
        shown = repr(uid)[:80]
        raise InvalidTaskUid(f"not a valid task uid: {shown}")
    return uid


def _json_or_text(body: str):
    """The JSON value of `body`, or the stripped text itself when it is not JSON."""
    text = body.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_task_uid(body: str) -> str:
    """The task uid from a submit answer: a JSON string (v1), an object with `uid` (v2).

    Both shapes are accepted from both generations, and so is a bare unquoted uid: servers in
    the field differ in details, and the uid is validated either way.
    """
    value = _json_or_text(body)
    if isinstance(value, dict):
        value = value.get("uid")
    return validate_uid(value)


def server_message(body: bytes | str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A short, printable message from an error body: JSON {"detail": ...}, a JSON string, or text."""
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    value = _json_or_text(text)
    if isinstance(value, dict):
        for key in ("detail", "message", "error"):
            if key in value:
                value = value[key]
                break
    if not isinstance(value, str):
        value = json.dumps(value)
    # Control characters would let a server forge log lines.
    value = "".join(ch if ch.isprintable() else " " for ch in value).strip()
    return truncate(value, limit)


def truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact_url(url: str) -> str:
    """The URL without user:password, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
