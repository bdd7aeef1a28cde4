"""The wait loop's rules, with a fake clock and a scripted client (the real client is tested
against the emulator in tests/integration/test_inference_client.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.inference.base import PollResult, ServerUnavailable, TaskFailed
from relay.inference.polling import PollPolicy, WaitStopped, next_step, wait_for_outputs
from tests.support.fake_time import FakeTime

SUBMITTED_AT = 1_700_000_000.0
ARCHIVE = Path("/downloads/abc.zip")

PENDING = PollResult("pending", None, "GET x: HTTP 551", 551)
NOT_FOUND = PollResult("not_found", None, "GET x: HTTP 554 (task not found)", 554)
READY = PollResult("ready", ARCHIVE, "", 200)
ERROR_500 = PollResult("error", None, "GET x: HTTP 500: boom", 500)
# v2 answers 500 for a task it does not know (deleted, lost) and for a passing error alike.
GONE = PollResult("gone", None, "GET x: HTTP 500 (InferenceServer 2.0 answers 500 for a task it does not know)", 500)


class ScriptedClient:
    """Answers polls from a script; the last answer repeats. Exceptions in the script are raised."""

    protocol = "v1"

    def __init__(self, script, fake_time: FakeTime | None = None, poll_cost: float = 0.0):
        self.script = list(script)
        self.polls: list[float] = []
        self.time_limits: list[float | None] = []
        self.fake_time, self.poll_cost = fake_time, poll_cost

    def poll(self, uid: str, time_limit: float | None = None):
        assert uid == "abc"
        self.time_limits.append(time_limit)
        if self.fake_time is not None:
            self.polls.append(self.fake_time.now - SUBMITTED_AT)
            self.fake_time.now += self.poll_cost
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


DEFAULT_POLICY = PollPolicy(interval=10, timeout=3600, not_found_grace=60)


def run(script, policy=DEFAULT_POLICY, start_after=0.0, **kwargs):
    fake = FakeTime(SUBMITTED_AT + start_after)
    client = ScriptedClient(script, fake, kwargs.pop("poll_cost", 0.0))
    lines: list[str] = []
    try:
        result = wait_for_outputs(
            client, "abc", SUBMITTED_AT, policy, clock=fake.clock, sleep=fake.sleep,
            on_progress=lines.append, **kwargs,
        )
    except Exception as exc:
        return exc, client, fake, lines
    return result, client, fake, lines


# --- the rules as a pure function ---


@pytest.mark.parametrize(
    "state, elapsed, expected",
    [
        ("ready", 5, "done"),
        ("pending", 5, "wait"),
        ("pending", 10**6, "wait"),  # the timeout is the loop's business, not the answer's
        ("not_found", 0, "wait"),
        ("not_found", 59.9, "wait"),
        ("not_found", 60, "fail"),
        ("failed", 1, "fail"),
        ("error", 1, "retry"),
    ],
)
def test_next_step(state, elapsed, expected):
    assert next_step(state, elapsed, PollPolicy(not_found_grace=60)) == expected


@pytest.mark.parametrize("gone_for, expected", [(0, "retry"), (59.9, "retry"), (60, "fail"), (10**6, "fail")])
def test_next_step_of_answers_saying_the_task_is_gone_counts_from_the_first_of_them(gone_for, expected):
    # Measured from the first such answer in a row, not from the submit: a task polled for a day
    # and then lost still gets the whole window.
    assert next_step("gone", 10**5, PollPolicy(not_found_grace=60), gone_for) == expected


# --- the loop ---


def test_pending_is_polled_every_interval_until_ready():
    result, client, fake, _ = run([PENDING, PENDING, PENDING, READY])
    assert result == ARCHIVE
    assert client.polls == [0, 10, 20, 30]
    assert fake.sleeps == [10, 10, 10]


def test_v1_not_found_right_after_submit_means_not_there_yet():
    result, client, _, lines = run([NOT_FOUND, NOT_FOUND, PENDING, READY])
    assert result == ARCHIVE
    assert len(client.polls) == 4
    assert any("not found yet" in line for line in lines)


def test_not_found_after_the_grace_period_fails_the_task():
    exc, client, _, _ = run([PENDING, PENDING, NOT_FOUND], policy=PollPolicy(interval=30, not_found_grace=45))
    assert isinstance(exc, TaskFailed)
    assert exc.status_code == 554
    assert "not found" in str(exc)
    assert client.polls == [0, 30, 60]


def test_resumed_polling_counts_the_grace_period_from_the_submit():
    # A relay restarted 10 minutes after the submit: a 554 now is final.
    exc, client, _, _ = run([NOT_FOUND], start_after=600)
    assert isinstance(exc, TaskFailed)
    assert client.polls == [600]


def test_v2_answers_that_the_task_is_gone_fail_it_after_the_grace_period_in_a_row():
    exc, client, _, _ = run([PENDING, GONE], policy=PollPolicy(interval=10, timeout=86400, not_found_grace=60))
    assert isinstance(exc, TaskFailed)
    assert exc.status_code == 500 and "is no longer on the server: every poll for" in str(exc)
    # Retried with the error backoff (about 10, 20, 40 s apart) from the first 500, at 10 s.
    assert client.polls[0] == 0 and 60 <= client.polls[-1] - client.polls[1] < 120


def test_an_answer_between_two_gone_answers_starts_the_window_again():
    script = [GONE, GONE, GONE, PENDING, GONE, GONE, GONE, READY]
    result, _, _, lines = run(script, policy=PollPolicy(interval=10, timeout=3600, not_found_grace=45,
                                                        max_transient_backoff=20))
    assert result == ARCHIVE
    assert any("no such task, or a passing error" in line for line in lines)


def test_no_poll_may_outlive_the_tasks_timeout():
    _, client, _, _ = run([PENDING, PENDING, READY], policy=PollPolicy(interval=10, timeout=100), start_after=5)
    assert client.time_limits == [95, 85, 75]


@pytest.mark.parametrize("code", [552, 553])
def test_failed_and_missing_output_fail_with_the_servers_message(code):
    failed = PollResult("failed", None, f"GET x: HTTP {code}: model crashed", code, "model crashed")
    exc, _, _, _ = run([PENDING, failed])
    assert isinstance(exc, TaskFailed)
    assert exc.status_code == code
    assert exc.server_message == "model crashed"
    assert "model crashed" in str(exc) and "abc" in str(exc)


def test_server_trouble_is_retried_with_growing_capped_waits_then_reset():
    policy = PollPolicy(interval=10, timeout=3600, max_transient_backoff=35)
    down = ServerUnavailable("GET x: ConnectionError: refused")
    script = [ERROR_500, down, ERROR_500, down, PENDING, ERROR_500, READY]
    result, _, fake, lines = run(script, policy=policy)
    assert result == ARCHIVE
    waits = fake.sleeps
    # about 10, 20, then capped at 35 (with +-10% jitter); a good answer resets the backoff
    assert waits[0] == pytest.approx(10, rel=0.11)
    assert waits[1] == pytest.approx(20, rel=0.11)
    assert all(w <= 35 for w in waits)
    assert waits[2] > 30 and waits[3] > 30
    assert waits[4] == 10  # after the pending answer: the normal interval
    assert waits[5] == pytest.approx(10, rel=0.11)
    assert any("server trouble" in line for line in lines)


def test_times_out_counting_from_the_submit_with_a_final_poll_at_the_deadline():
    exc, client, fake, _ = run([PENDING], policy=PollPolicy(interval=40, timeout=100))
    assert isinstance(exc, TaskFailed)
    assert "timed out after 100s" in str(exc)
    assert exc.status_code is None
    assert client.polls == [0, 40, 80, 100]
    assert fake.now - SUBMITTED_AT == 100


def test_timeout_is_not_extended_by_server_trouble():
    exc, client, fake, _ = run(
        [ServerUnavailable("down")], policy=PollPolicy(interval=5, timeout=300, max_transient_backoff=60)
    )
    assert isinstance(exc, TaskFailed) and "timed out" in str(exc)
    assert fake.now - SUBMITTED_AT == 300


def test_already_past_the_timeout_on_resume_does_not_poll():
    exc, client, _, _ = run([READY], policy=PollPolicy(timeout=100), start_after=101)
    assert isinstance(exc, TaskFailed)
    assert client.polls == []


def test_slow_polls_count_against_the_timeout():
    exc, client, _, _ = run([PENDING], policy=PollPolicy(interval=10, timeout=100), poll_cost=30)
    assert isinstance(exc, TaskFailed)
    assert client.polls == [0, 40, 80]  # 30 s per poll + 10 s wait; the third ends at 110 > 100


def test_progress_is_reported_on_changes_and_at_most_once_a_minute():
    script = [NOT_FOUND] + [PENDING] * 20 + [READY]
    policy = PollPolicy(interval=5, timeout=3600, not_found_grace=60, progress_every=60)
    result, _, _, lines = run(script, policy=policy)
    assert result == ARCHIVE
    assert lines[0].startswith("task abc not found yet after 0s")
    assert lines[1] == "task abc pending after 5s"
    assert lines[2] == "task abc still pending after 65s"
    assert lines[-1] == "task abc outputs ready after 105s"
    assert len(lines) == 4


def test_server_messages_with_braces_are_reported_verbatim():
    odd = PollResult("error", None, 'GET x: HTTP 500: {"detail": "{oops}"}', 500)
    _, _, _, lines = run([odd, READY])
    assert '{"detail": "{oops}"}' in lines[0]


def test_should_stop_interrupts_the_wait():
    calls = iter([False, False, True])
    exc, client, _, _ = run([PENDING], should_stop=lambda: next(calls))
    assert isinstance(exc, WaitStopped)
    assert len(client.polls) == 2


def test_unexpected_exceptions_from_the_client_propagate():
    exc, _, _, _ = run([RuntimeError("bug")])
    assert isinstance(exc, RuntimeError)
