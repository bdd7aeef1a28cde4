"""Waiting for a task's outputs: poll until ready, failed, or out of time.

All times are measured from the submit (`submitted_at`, an epoch time the relay persists), not
from the start of this call: after a restart the relay resumes polling the same task, and the
grace period and GET_TIMEOUT keep counting from when the task was really submitted. No single
poll (with its download) may run past GET_TIMEOUT either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from relay.retry import Backoff

from .base import InferenceClient, InferenceError, PollResult, ServerUnavailable, TaskFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PollPolicy:
    interval: float = 15.0  # GET_INTERVAL
    timeout: float = 86400.0  # GET_TIMEOUT, counted from the submit
    # How long "the server does not know this task" is tolerated: v1 answers a submit before
    # it has stored the task, so 554 this soon after the submit means "not yet"; v2 answers 500
    # for a task it does not know (and for a passing error), so 500s for this long in a row mean
    # the task is gone.
    not_found_grace: float = 60.0
    max_transient_backoff: float = 60.0  # cap of the wait between polls while the server errs
    progress_every: float = 60.0  # an unchanged state is reported at most this often


class WaitStopped(InferenceError):
    """should_stop() asked to stop; the task is still on the server and can be resumed."""


Step = Literal["done", "wait", "retry", "fail"]


def next_step(state: str, elapsed: float, policy: PollPolicy, gone_for: float = 0.0) -> Step:
    """What a poll answer means, `elapsed` seconds after the submit. The rules, as a pure function.

    `gone_for`: how long the answers have said 'gone' without a break (0 at the first one).
    """
    if state == "ready":
        return "done"
    if state == "pending":
        return "wait"
    if state == "not_found":
        return "wait" if elapsed < policy.not_found_grace else "fail"
    if state == "gone":
        return "retry" if gone_for < policy.not_found_grace else "fail"
    if state == "failed":
        return "fail"
    return "retry"  # 'error': 5xx, connection trouble, unexpected answers


class _Progress:
    """Human-readable progress: on every change of state, else at most every `every` seconds."""

    def __init__(self, uid: str, every: float, sink: Callable[[str], None] | None):
        self.uid, self.every, self.sink = uid, every, sink
        self.state: str | None = None
        self.last_report = float("-inf")

    def __call__(self, state: str, elapsed: float, line: str, repeated: str | None = None) -> None:
        """Report `line` on a change of state, `repeated` (default: `line`) when unchanged."""
        changed = state != self.state
        if not changed and elapsed - self.last_report < self.every:
            return
        self.state, self.last_report = state, elapsed
        line = line if changed or repeated is None else repeated
        if self.sink is not None:
            self.sink(line)
        else:
            log.info("%s", line)


def _failure(uid: str, result: PollResult, elapsed: float, gone_for: float) -> TaskFailed:
    if result.state == "not_found":
        text = f"task {uid} not found on the server {elapsed:.0f}s after submit: {result.message}"
    elif result.state == "gone":
        text = (f"task {uid} is no longer on the server: every poll for {gone_for:.0f}s answered "
                f"HTTP {result.status_code}, the server's answer for an unknown or deleted task: "
                f"{result.message}")
    else:
        text = f"task {uid} failed: {result.message}"
    return TaskFailed(text, result.status_code or None, result.server_message)


def _timed_out(uid: str, elapsed: float, policy: PollPolicy, last: PollResult | None) -> TaskFailed:
    text = f"task {uid} timed out after {elapsed:.0f}s (GET_TIMEOUT {policy.timeout:.0f}s)"
    if last is not None:
        text += f"; last answer: {last.state}"
        if last.state == "error" and last.message:
            text += f" ({last.message})"
    return TaskFailed(text)


def wait_for_outputs(
    client: InferenceClient,
    uid: str,
    submitted_at: float,
    policy: PollPolicy,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], object] = time.sleep,
    on_progress: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Poll `uid` until its output archive is downloaded; return the archive's path.

    Raises TaskFailed (failed, missing output, not found after the grace period, timed out) or
    WaitStopped. Server trouble (5xx, connection errors) is retried with a capped backoff, still
    bounded by the timeout. `sleep` may be an Event's wait, so that stopping need not wait out
    the interval; `should_stop` is checked before every poll.
    """
    progress = _Progress(uid, policy.progress_every, on_progress)
    backoff = Backoff(initial=policy.interval, maximum=max(policy.interval, policy.max_transient_backoff))
    error_delays = None  # a backoff sequence while the server is in trouble, reset by any answer
    gone_since: float | None = None  # when the current run of 'gone' answers began
    last: PollResult | None = None
    while True:
        if should_stop is not None and should_stop():
            raise WaitStopped(f"stopped waiting for task {uid}")
        elapsed = clock() - submitted_at
        if elapsed > policy.timeout:
            raise _timed_out(uid, elapsed, policy, last)
        try:
            result = client.poll(uid, time_limit=policy.timeout - elapsed)
        except ServerUnavailable as exc:
            result = PollResult("error", None, str(exc), exc.status_code or 0)
        last = result
        elapsed = clock() - submitted_at  # a poll can take a while (it downloads the outputs)
        if result.state != "gone":
            gone_since = None
        elif gone_since is None:
            gone_since = elapsed
        gone_for = 0.0 if gone_since is None else elapsed - gone_since
        step = next_step(result.state, elapsed, policy, gone_for)
        if step == "done":
            progress("ready", elapsed, f"task {uid} outputs ready after {elapsed:.0f}s")
            return result.archive_path
        if step == "fail":
            raise _failure(uid, result, elapsed, gone_for)
        if step == "retry":
            error_delays = error_delays or iter(backoff)
            delay = next(error_delays)
            what = "no such task, or a passing error" if result.state == "gone" else "server trouble"
            progress(result.state, elapsed, f"task {uid}: {what} after {elapsed:.0f}s, "
                     f"retrying in {delay:.0f}s: {result.message}")
        else:
            error_delays = None
            delay = policy.interval
            if result.state == "not_found":
                grace = f"(within the {policy.not_found_grace:.0f}s grace period after submit)"
                progress("not_found", elapsed, f"task {uid} not found yet after {elapsed:.0f}s {grace}",
                         f"task {uid} still not found after {elapsed:.0f}s {grace}")
            else:
                progress("pending", elapsed, f"task {uid} pending after {elapsed:.0f}s",
                         f"task {uid} still pending after {elapsed:.0f}s")
        remaining = policy.timeout - elapsed
        if remaining <= 0:
            raise _timed_out(uid, elapsed, policy, last)
        # The last wait is shortened so that one final poll happens right at the timeout.
        sleep(min(delay, remaining))
