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

# An output archive is refused when its HTTP body, decoded, is larger than this (the extracted
# size is limited separately by safe_extract).
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3
# The slowest transfer a request is given time for: every request has a total deadline of its
# per-operation timeout plus the bytes it may move at this rate (see ClientSettings).
DEFAULT_MIN_TRANSFER_RATE = 256 * 1024
MAX_MESSAGE_CHARS = 500
# Bodies of error answers are read only this far: a hostile or broken server could stream forever.
MAX_ERROR_BODY_BYTES = 64 * 1024

# Real task uids are secrets.token_urlsafe() values: 43 characters of A-Z a-z 0-9 '-' '_', and
# about 3 % of them start with '-' or '_'. The alphabet has no '/', '.', '%', '?' or '#': a valid
# uid cannot climb out of the tasks URL (v1 joins it as a path segment) nor out of a folder. It
# can look like an option or a hidden file, so it is never used as a file name on its own (see
# task_file_name). The length is bounded because the value comes from the network.
_TASK_UID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class ClientSettings:
    # PEM file (may hold several certificates); None: requests' default CA store. TLS is always
    # verified: against this bundle, or the default store. There is no way to turn it off.
    ca_bundle: str | None = None
    # Connect and read timeouts, per socket operation: POST_TIMEOUT for the submit (how long the
    # server may think before it answers), request_timeout for polls and deletes.
    post_timeout: float = 60.0
    request_timeout: float = 30.0
    # The decoded bytes of an output download (MAX_OUTPUT_BYTES), counted as they are written.
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    # Every request also has a total deadline, whatever the server sends (a slow drip, a body
    # without end): its timeout above plus the bytes it may move (the upload; at most
    # max_download_bytes) at this many bytes per second. A poll never outlives its task's timeout.
    min_transfer_rate: float = DEFAULT_MIN_TRANSFER_RATE


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
    (e.g. the response timed out): for a submit that means the task may exist on the server, and
    the submit raises SubmitOutcomeUnknown instead.
    """

    def __init__(self, message: str, status_code: int | None = None, maybe_accepted: bool = False):
        super().__init__(message)
        self.status_code = status_code
        self.maybe_accepted = maybe_accepted


class SubmitOutcomeUnknown(ServerUnavailable):
    """A submit whose upload reached the server, and whose answer did not come back.

    The server may have created the task (a v2 server whose queue is down stores the task and
    then hangs), and neither protocol can name it: submitting again may run the model twice. The
    client never repeats such a submit itself; the caller decides (the life cycle allows one
    repeat, flagged as a possible duplicate). Raised for: a read timeout or a dropped connection
    after the whole upload was sent, a request deadline passed after it, and 504 Gateway Timeout
    (a reverse proxy that gave up waiting for the server's answer).
    """

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message, status_code, maybe_accepted=True)


# pending: 551; ready: 200 (downloaded); failed: 552/553 or an answer that will not change (a
# redirect, an output over the limit); not_found: 554 (v1: maybe not stored yet); gone: an answer
# that means "no such task" unless it persists only briefly (v2 answers 500 for an unknown or
# deleted uid); error: anything transient (5xx, connection trouble, a request deadline).
PollState = Literal["pending", "ready", "failed", "not_found", "gone", "error"]


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
    url: str  # the server's URL as configured (normalized), for messages

    def submit(self, archive_path: Path, model: str) -> str: ...

    def poll(self, uid: str, time_limit: float | None = None) -> PollResult:
        """One poll; on 200 the outputs are downloaded. `time_limit`: at most this many seconds."""
        ...

    def delete(self, uid: str) -> None: ...

    def archive_format(self) -> str: ...


class InvalidTaskUid(InferenceError):
    """The server answered a submit with something that is not a usable task uid."""


def validate_uid(uid) -> str:
    if not isinstance(uid, str) or _TASK_UID.fullmatch(uid) is None:
        shown = repr(uid)[:80]
        raise InvalidTaskUid(f"not a valid task uid: {shown}")
    return uid


def task_file_name(uid: str, suffix: str) -> str:
    """A file name for something of task `uid`: 'task-<uid><suffix>'.

    Never the uid alone: a real uid may start with '-' (an option to any program that gets the
    name) or '_', and the prefix keeps every such name an ordinary, visible file.
    """
    return f"task-{validate_uid(uid)}{suffix}"


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
    # v1 nests its message: {"detail": {"detail": "..."}}. A few levels are unwrapped, no more.
    for _ in range(3):
        if not isinstance(value, dict):
            break
        key = next((k for k in ("detail", "message", "error") if k in value), None)
        if key is None:
            break
        value = value[key]
    if not isinstance(value, str):
        value = json.dumps(value)
    return printable(value, limit)


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` with control characters blanked (they would let a server forge log lines), truncated."""
    return truncate("".join(ch if ch.isprintable() else " " for ch in text).strip(), limit)


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
