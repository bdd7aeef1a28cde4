"""Exponential backoff and a retry loop, shared by the InferenceServer client and DICOM delivery.

Kept generic on purpose: no knowledge of HTTP or DICOM here. Callers say which exceptions are
transient (`retry_on`), how long they may keep trying (`deadline`), and get told about every
retry (`on_retry`) so that their logs explain a delay. Time and sleep are injectable so that the
rules can be tested without waiting.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delays of initial, initial*factor, initial*factor^2, ... capped at `maximum`.

    Each delay is spread by +-`jitter` (a fraction) so that many relays that lost the same server
    do not hammer it in lock-step when it comes back; the cap stays a hard upper bound.
    Iterating yields an endless, fresh sequence each time (a new `iter()` is a reset).
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self):
        if self.initial < 0 or self.maximum < 0:
            raise ValueError("backoff delays must not be negative")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")

    def base_delay(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0-based), without jitter."""
        # Stop multiplying once past the cap: factor**attempt would overflow after ~1000 retries.
        delay = self.initial
        for _ in range(attempt):
            if delay >= self.maximum:
                break
            delay *= self.factor
        return min(delay, self.maximum)

    def delay(self, attempt: int) -> float:
        base = self.base_delay(attempt)
        spread = 1.0 + self.jitter * (2.0 * self.random() - 1.0)
        return min(base * spread, self.maximum)

    def __iter__(self) -> Iterator[float]:
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1


def retry_call(
    fn: Callable[[], T],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    deadline: float | None = None,
    max_attempts: int | None = None,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[BaseException, int, float], None] | None = None,
    schedule: Callable[[BaseException], Backoff] | None = None,
) -> T:
    """Call `fn` until it returns, retrying exceptions of the `retry_on` types with backoff.

    `deadline` is a budget in seconds from the first call (None: no time limit); the last wait is
    shortened so that one final attempt happens at the deadline rather than giving up early.
    `max_attempts` bounds the number of calls (None: unbounded). At least one of the two should
    be set unless retrying forever is really meant. Exceptions not in `retry_on` propagate at
    once. When giving up, the last exception is re-raised with a note saying how long we tried.
    `on_retry(exception, attempt_number, delay)` is called before each wait (attempt_number is
    1 for the first failure). `schedule(exception)`, when given, picks the Backoff for that
    failure instead of `backoff` (each Backoff keeps its own sequence), or raises to stop.
    """
    backoff = backoff or Backoff()
    sequences: dict[Backoff, Iterator[float]] = {}
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except retry_on as exc:
            chosen = backoff if schedule is None else schedule(exc)
            delay = next(sequences.setdefault(chosen, iter(chosen)))
            if max_attempts is not None and attempt >= max_attempts:
                _give_up(exc, attempt, clock() - started)
                raise
            if deadline is not None:
                remaining = deadline - (clock() - started)
                if remaining <= 0:
                    _give_up(exc, attempt, clock() - started)
                    raise
                delay = min(delay, remaining)
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            else:
                log.debug("attempt %d failed (%s), retrying in %.1fs", attempt, exc, delay)
            sleep(delay)


def _give_up(exc: BaseException, attempts: int, elapsed: float) -> None:
    exc.add_note(f"gave up after {attempts} attempt(s) over {elapsed:.1f}s")
