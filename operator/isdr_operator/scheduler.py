"""When each DicomSeries needs its next look: a few worker threads, one heap per class of work, no
per-object timers.

kopf's daemons and timers put a finalizer on every object they run for, which would block the
deletion of a DicomSeries whenever the operator is down. Instead, watch events and the driver's
own answers ("look again in 3.2 s") feed this scheduler, and its workers take the steps, never two
at once for one series (a poke while its step runs waits for the step to end). A step is mostly
waiting for the API server: with several workers, fifty series that complete together are
dispatched side by side, not one API round trip after another.
Steps are taken only while the gate is open (isdr_operator.peering: this is the one active
operator); while it is closed, pokes are queued and wait.

Three classes of work, each due look of a class going before every due look of the next:
- RECEIVING: a series still receiving, or just complete. Its next step is its dispatch, and a
  sender's series waits for it; nothing else the operator does is as urgent.
- FRESH: a watch event that changed a series (a Job's progress, a late instance, an
  administrator's request), and the steps that follow from it.
- BACKGROUND: the re-examination of every series the operator finds when it starts or resumes.
A series that completes while thousands of old ones are looked at again, or while fifty Jobs
finish, is dispatched without waiting behind them.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from enum import IntEnum
from typing import Callable

log = logging.getLogger("isdr_operator.scheduler")


class SchedulerStuck(RuntimeError):
    pass


class Work(IntEnum):
    """The class of a look; a lower one goes first."""

    RECEIVING = 0
    FRESH = 1
    BACKGROUND = 2


WORKERS = 4


class Scheduler:
    def __init__(self, step: Callable[[str], float | None], clock=time.monotonic,
                 retry_after_error: float = 5.0, gate=None, workers: int = WORKERS):
        self._step = step
        self._gate = gate  # anything with wait_open(timeout) -> bool; None: always open
        self._clock = clock
        self._retry_after_error = retry_after_error
        # One heap per class of (time, name); an entry counts only while it is what _due says for
        # the name (else it was superseded or forgotten).
        self._heaps: dict[Work, list[tuple[float, str]]] = {work: [] for work in Work}
        self._due: dict[str, tuple[float, Work]] = {}  # name -> (earliest time wanted, class)
        self._cond = threading.Condition()
        self._stopped = False
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._running: dict[str, float] = {}  # series stepped now -> clock() when its step began
        self._deferred: dict[str, tuple[float, Work]] = {}  # poked while its step runs

    def poke(self, name: str, delay: float = 0.0, work: Work = Work.FRESH) -> None:
        """Look at `name` after `delay` seconds (or sooner if it is already due sooner), in the
        more urgent of `work` and the class it waits in already."""
        at = self._clock() + max(0.0, delay)
        with self._cond:
            if name in self._running:
                due = self._deferred.get(name)
                self._deferred[name] = (at, work) if due is None else (min(at, due[0]), min(work, due[1]))
                return
            wanted = (at, work)
            if name in self._due:
                due_at, due_work = self._due[name]
                wanted = (min(at, due_at), min(work, due_work))
                if wanted == (due_at, due_work):
                    return
            self._due[name] = wanted
            heapq.heappush(self._heaps[wanted[1]], (wanted[0], name))
            self._cond.notify()

    def forget(self, name: str) -> None:
        with self._cond:
            self._due.pop(name, None)
            self._deferred.pop(name, None)

    def _head(self, work: Work) -> tuple[float, str] | None:
        heap = self._heaps[work]
        while heap and self._due.get(heap[0][1]) != (heap[0][0], work):
            heapq.heappop(heap)  # superseded by an earlier or more urgent poke, or forgotten
        return heap[0] if heap else None

    def _next(self) -> tuple[str, Work] | None:
        """The next name to step, and its class (None: stopped)."""
        with self._cond:
            while not self._stopped:
                now = self._clock()
                heads = {work: head for work in Work if (head := self._head(work)) is not None}
                due = next((work for work in Work if work in heads and heads[work][0] <= now), None)
                if due is None:
                    if not heads:
                        self._cond.wait()
                    else:
                        self._cond.wait(min(at for at, _ in heads.values()) - now)
                    continue
                _, name = heapq.heappop(self._heaps[due])
                del self._due[name]
                self._running[name] = self._clock()
                return name, due
            return None

    def pending(self) -> dict[str, int]:
        """How many series are due for a look now, per class, and how many later (for the tests
        and the benchmark)."""
        with self._cond:
            now = self._clock()
            counts = {work.name.lower(): 0 for work in Work} | {"later": 0}
            for at, work in [*self._due.values(), *self._deferred.values()]:
                counts["later" if at > now else work.name.lower()] += 1
            return counts

    def _wait_for_gate(self) -> bool:
        """Block while the gate is closed; False once the scheduler is stopped."""
        while self._gate is not None and not self._gate.wait_open(0.5):
            if self._stopped:
                return False
        return not self._stopped

    def run(self) -> None:
        while (taken := self._next()) is not None:
            if not self._wait_for_gate():
                return
            self.take_step(*taken)

    def take_step(self, name: str, work: Work) -> None:
        """Step `name` now (taken by _next), and schedule the next look it asks for."""
        try:
            again = self._step(name)
        except Exception:  # one broken series must not stop the others
            log.exception("step for %s failed; retrying in %.0fs", name, self._retry_after_error)
            again = self._retry_after_error
        finally:
            with self._cond:
                self._running.pop(name, None)
                deferred = self._deferred.pop(name, None)
        if deferred is not None:
            self.poke(name, max(0.0, deferred[0] - self._clock()), deferred[1])
        if again is not None:
            # What follows a dispatch is no longer the sender's business (a series that
            # receives more comes back as RECEIVING with the receiver's next status write).
            self.poke(name, again, max(work, Work.FRESH))

    def health(self, stuck_after: float) -> dict:
        """For the liveness probe: raises SchedulerStuck if no step can run any more."""
        if not self._threads or not all(thread.is_alive() for thread in self._threads):
            raise SchedulerStuck("a series scheduler thread is not running")
        with self._cond:
            now = self._clock()
            running_for = max((now - started for started in self._running.values()), default=0.0)
            scheduled = len(self._due) + len(self._deferred)
        if running_for > stuck_after:
            raise SchedulerStuck(f"one series step has been running for {running_for:.0f}s")
        return {"scheduled": scheduled, "step_running_for": round(running_for, 1),
                "active": self._gate is None or self._gate.wait_open(0)}

    def start(self) -> None:
        self._threads = [threading.Thread(target=self.run, name=f"series-scheduler-{number}", daemon=True)
                         for number in range(1, self._workers + 1)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
