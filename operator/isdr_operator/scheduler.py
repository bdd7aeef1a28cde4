"""When each DicomSeries needs its next look: one thread, one heap, no per-object timers.

kopf's daemons and timers put a finalizer on every object they run for, which would block the
deletion of a DicomSeries whenever the operator is down. Instead, watch events and the driver's
own answers ("look again in 3.2 s") feed this scheduler, and one worker thread takes the steps.
Steps are taken only while the gate is open (isdr_operator.peering: this is the one active
operator); while it is closed, pokes are queued and wait.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("isdr_operator.scheduler")


class SchedulerStuck(RuntimeError):
    pass


class Scheduler:
    def __init__(self, step: Callable[[str], float | None], clock=time.monotonic,
                 retry_after_error: float = 5.0, gate=None):
        self._step = step
        self._gate = gate  # anything with wait_open(timeout) -> bool; None: always open
        self._clock = clock
        self._retry_after_error = retry_after_error
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}  # name -> the earliest time it is wanted
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # clock() when the running step began

    def poke(self, name: str, delay: float = 0.0) -> None:
        """Look at `name` after `delay` seconds (or sooner if it is already due sooner)."""
        at = self._clock() + max(0.0, delay)
        with self._cond:
            if name in self._due and self._due[name] <= at:
                return
            self._due[name] = at
            heapq.heappush(self._heap, (at, name))
            self._cond.notify()

    def forget(self, name: str) -> None:
        with self._cond:
            self._due.pop(name, None)

    def _next(self) -> str | None:
        with self._cond:
            while not self._stopped:
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier poke, or forgotten
                if not self._heap:
                    self._cond.wait()
                    continue
                at, name = self._heap[0]
                wait = at - self._clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                del self._due[name]
                return name
            return None

    def _wait_for_gate(self) -> bool:
        """Block while the gate is closed; False once the scheduler is stopped."""
        while self._gate is not None and not self._gate.wait_open(0.5):
            if self._stopped:
                return False
        return not self._stopped

    def run(self) -> None:
        while (name := self._next()) is not None:
            if not self._wait_for_gate():
                return
            self._step_started = self._clock()
            try:
                again = self._step(name)
            except Exception:  # one broken series must not stop the others
                log.exception("step for %s failed; retrying in %.0fs", name, self._retry_after_error)
                again = self._retry_after_error
            finally:
                self._step_started = None
            if again is not None:
                self.poke(name, again)

    def health(self, stuck_after: float) -> dict:
        """For the liveness probe: raises SchedulerStuck if no step can run any more."""
        if self._thread is None or not self._thread.is_alive():
            raise SchedulerStuck("the series scheduler thread is not running")
        started = self._step_started
        running_for = 0.0 if started is None else self._clock() - started
        if running_for > stuck_after:
            raise SchedulerStuck(f"one series step has been running for {running_for:.0f}s")
        with self._cond:
            return {"scheduled": len(self._due), "step_running_for": round(running_for, 1),
                    "active": self._gate is None or self._gate.wait_open(0)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="series-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
