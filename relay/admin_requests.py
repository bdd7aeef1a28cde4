"""An administrator's requests to a running `isdr run` (`isdr series retry|cancel`), as small
JSON documents in the relay's own storage, beside its state.

- state/requests/<id>.json: what the command line asks: {"id", "action", "series", "task", "at"}.
- state/answers/<id>.json: what the relay did about it: {"id", "accepted", "message", "at"}.

The relay's scheduler reads the requests at every tick (POST_INTERVAL), carries each out as the
life-cycle rules decide (relay.lifecycle.retry_decision, cancel_decision), writes the answer and
deletes the request; the command line waits for the answer, prints it, and deletes it.

Why documents in storage and not an HTTP endpoint: they work wherever the relay's storage is (a
folder or an S3 bucket) with no port to open, secure and document; whoever may write there may
already read every instance, so they grant nothing new; and a request made while the relay is
stopped is carried out when it starts. Ids are random hex, validated before they name a file.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass

from relay.lifecycle import AdminAction
from relay.storage.base import Storage, StorageError
from relay.uids import is_valid_uid

log = logging.getLogger("relay.requests")

REQUEST_PREFIX = "state/requests/"
ANSWER_PREFIX = "state/answers/"
ANSWER_RETENTION = 3600.0  # an answer nobody fetched (the command was interrupted) is removed after this
_ID = re.compile(r"[0-9a-f]{32}")
_TASK_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class BadRequest(ValueError):
    """A request document that cannot be carried out (the message says why)."""


@dataclass(frozen=True)
class Request:
    id: str
    action: AdminAction
    series: str  # a Series Instance UID
    task: str | None = None  # one task of the series, or None: all its tasks concerned
    at: float = 0.0

    @classmethod
    def new(cls, action: AdminAction, series: str, task: str | None, now: float) -> "Request":
        return checked(cls(uuid.uuid4().hex, action, series, task, now))


@dataclass(frozen=True)
class Answer:
    id: str
    accepted: bool
    message: str
    at: float = 0.0


def checked(request: Request) -> Request:
    """`request`, if every field is one the relay can act on (else BadRequest)."""
    if not _ID.fullmatch(request.id):
        raise BadRequest(f"request id {request.id!r} is not 32 hex digits")
    if not is_valid_uid(request.series):
        raise BadRequest(f"{request.series!r} is not a Series Instance UID (digits and dots, at most 64)")
    if request.task is not None and not _TASK_ID.fullmatch(request.task):
        raise BadRequest(f"{request.task!r} is not a task id (lower-case letters, digits and '-')")
    return request


def _request_from(data: dict) -> Request:
    try:
        return checked(Request(id=str(data["id"]), action=AdminAction(data["action"]), series=str(data["series"]),
                               task=None if data.get("task") is None else str(data["task"]),
                               at=float(data.get("at") or 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"unreadable request: {exc}") from None


class RequestStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    # --- the command line's side ---

    def ask(self, request: Request) -> None:
        self.storage.put_state(f"{REQUEST_PREFIX}{request.id}.json", json.dumps(
            {**asdict(request), "action": str(request.action)}).encode())

    def answer_to(self, request_id: str) -> Answer | None:
        """The relay's answer, once there (and then removed from storage)."""
        key = f"{ANSWER_PREFIX}{request_id}.json"
        try:
            data = json.loads(self.storage.get(key))
        except KeyError:
            return None
        self.storage.delete([key])
        return Answer(str(data["id"]), bool(data["accepted"]), str(data["message"]), float(data.get("at") or 0))

    def withdraw(self, request_id: str) -> bool:
        """Take back a request the relay has not read yet; False when it was read meanwhile."""
        key = f"{REQUEST_PREFIX}{request_id}.json"
        try:
            self.storage.get(key)
        except KeyError:
            return False
        self.storage.delete([key])
        return True

    # --- the relay's side ---

    def pending(self) -> list[Request]:
        """Requests waiting, oldest first; an unreadable one is answered as refused and dropped."""
        found = []
        for info in self.storage.list(REQUEST_PREFIX):
            request_id = info.key[len(REQUEST_PREFIX):].removesuffix(".json")
            try:
                request = _request_from(json.loads(self.storage.get(info.key)))
                if request.id != request_id:
                    raise BadRequest("its id is not its file name")
                found.append(request)
            except KeyError:
                continue  # withdrawn meanwhile
            except (BadRequest, ValueError) as exc:
                log.error("ignoring request %s: %s", info.key, exc)
                if _ID.fullmatch(request_id):
                    self.answer(request_id, False, f"request refused: {exc}", time.time())
                self.storage.delete([info.key])
        return sorted(found, key=lambda r: r.at)

    def answer(self, request_id: str, accepted: bool, message: str, now: float, keep_request: bool = False) -> None:
        """Say what became of a request, and drop it (the answer first: a crash in between
        repeats the request, whose rules then refuse what is already done). `keep_request`:
        it is not done yet (a cancel, until its tasks are recorded as ended; then `done`)."""
        self.storage.put_state(f"{ANSWER_PREFIX}{request_id}.json", json.dumps(
            asdict(Answer(request_id, accepted, message, now))).encode())
        if not keep_request:
            self.done(request_id)

    def done(self, request_id: str) -> None:
        self.storage.delete([f"{REQUEST_PREFIX}{request_id}.json"])

    def sweep_answers(self, now: float) -> int:
        """Remove answers nobody fetched for ANSWER_RETENTION seconds."""
        old = [info.key for info in self.storage.list(ANSWER_PREFIX) if info.modified < now - ANSWER_RETENTION]
        if old:
            try:
                self.storage.delete(old)
            except StorageError as exc:
                log.warning("cannot remove %d old answers: %s", len(old), exc)
        return len(old)
