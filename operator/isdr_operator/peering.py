"""One active operator: kopf's peering rule, applied to everything the operator does.

kopf pauses its own watch streams when its peering says so, but the operator also acts outside
them: the series scheduler's thread, and the resynchronisation when it starts. So the operator
reads the same KopfPeering object kopf keeps alive and applies kopf's rule itself (an operator
runs only while no other live operator has the same or a higher priority); every action (steps,
Job events, Fingerprint statuses) waits for that verdict. Two replicas with the same priority
both pause, as kopf's do, until one of them is gone (it removes itself on a clean exit; a killed
one expires after its lifetime): there is never a moment with two active operators, because an
operator counts as active only once its own keep-alive is in the object for the others to see.

The status of the object is kopf's documented format: {identity: {priority, lastseen, lifetime}}.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("isdr_operator.peering")

POLL_INTERVAL = 2.0


@dataclass(frozen=True)
class Verdict:
    active: bool
    reason: str


def _parse_time(value) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _alive(entry, now: datetime.datetime) -> bool:
    if not isinstance(entry, dict):
        return False
    seen = _parse_time(entry.get("lastseen"))
    try:
        lifetime = float(entry.get("lifetime", 60))
    except (TypeError, ValueError):
        return False
    return seen is not None and seen + datetime.timedelta(seconds=lifetime) > now


def _priority(entry: dict) -> int:
    try:
        return int(entry.get("priority", 0))
    except (TypeError, ValueError):
        return 0


def verdict(status: dict | None, identity: str, priority: int, now: datetime.datetime) -> Verdict:
    """Whether the operator `identity` may act, from the peering object's status at `now`."""
    status = status if isinstance(status, dict) else {}
    if not _alive(status.get(identity), now):
        return Verdict(False, "its own keep-alive is not (or no longer) in the peering object")
    others = {name: entry for name, entry in status.items() if name != identity and _alive(entry, now)}
    higher = sorted(name for name, entry in others.items() if _priority(entry) > priority)
    if higher:
        return Verdict(False, f"paused in favour of the operator(s) of higher priority {', '.join(higher)}")
    same = sorted(name for name, entry in others.items() if _priority(entry) == priority)
    if same:
        return Verdict(False, f"another operator with the same priority runs ({', '.join(same)}): "
                       "all of them pause until only one is left")
    return Verdict(True, "the only live operator of its priority")


def own_identity(environ=os.environ) -> str:
    """The name this operator announces in the peering: POD_ID (the chart sets the pod's name),
    else user@host/pid/random, unique per process as kopf's own default."""
    if environ.get("POD_ID"):
        return environ["POD_ID"]
    return f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


class Gate:
    """Open while this operator may act. `standalone()` is always open (no peering)."""

    def __init__(self, *, read_status: Callable[[], dict | None] | None, identity: str, priority: int = 0,
                 interval: float = POLL_INTERVAL,
                 now=lambda: datetime.datetime.now(datetime.timezone.utc)):
        self._read_status = read_status
        self.identity = identity
        self.priority = priority
        self._on_change: Callable[[bool], None] | None = None
        self._interval = interval
        self._now = now
        self._open = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.reason = "not looked at the peering yet"

    @classmethod
    def standalone(cls, identity: str = "standalone") -> "Gate":
        gate = cls(read_status=None, identity=identity)
        gate._open.set()
        gate.reason = "standalone: no peering"
        return gate

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(active)` (in the gate's thread) whenever the verdict flips. When it
        fails on opening, the gate closes again and the next look tries again."""
        self._on_change = callback

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def wait_open(self, timeout: float | None = None) -> bool:
        return self._open.wait(timeout)

    def check(self) -> bool:
        """Read the peering once and open or close; returns whether it is open."""
        if self._read_status is None:
            return True
        try:
            status = self._read_status()
        except Exception as exc:  # noqa: BLE001 - cannot see the peering: cannot know we are alone
            result = Verdict(False, f"cannot read the peering object: {exc}")
        else:
            if status is None:
                result = Verdict(False, "the peering object does not exist")
            else:
                result = verdict(status, self.identity, self.priority, self._now())
        if result.active == self._open.is_set():
            if result.reason != self.reason:
                log.info("operator %s still %s: %s", self.identity, "active" if result.active else "paused",
                         result.reason)
                self.reason = result.reason
            return result.active
        self.reason = result.reason
        if not result.active:
            self._open.clear()
            log.warning("operator %s paused: %s", self.identity, result.reason)
            self._notify(False)
            return False
        self._open.set()
        log.info("operator %s active: %s", self.identity, result.reason)
        if not self._notify(True):
            self._open.clear()
            self.reason = "catching up failed; trying again"
        return self._open.is_set()

    def _notify(self, active: bool) -> bool:
        if self._on_change is None:
            return True
        try:
            self._on_change(active)
        except Exception:  # noqa: BLE001 - e.g. the API went away while catching up
            log.exception("operator %s: reacting to %s failed", self.identity, "activation" if active else "pause")
            return False
        return True

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.check()
            self._stopped.wait(self._interval)

    def start(self) -> None:
        if self._read_status is None:
            return
        self._thread = threading.Thread(target=self._run, name="peering-gate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._read_status is not None:
            self._open.clear()
        if self._thread is not None:
            self._thread.join(timeout=10)
