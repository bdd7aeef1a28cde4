"""submit_with_retry's rules, with a scripted client and a fake clock (the real client is tested
against the emulator, and behind nginx, in tests/integration/test_inference_client.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.inference.client import (
    ServerUnavailable,
    SubmitOutcomeUnknown,
    SubmitRejected,
    submit_with_retry,
)
from relay.retry import Backoff
from tests.support.fake_time import FakeTime

REFUSED = ServerUnavailable("POST http://h/api/tasks/: ConnectionError: Connection refused")
INTERNAL = ServerUnavailable("POST http://h/api/tasks/?human_readable_id=m: HTTP 500: Internal Server Error", 500)
BAD_GATEWAY = ServerUnavailable("POST http://h/api/tasks/: HTTP 502", 502)
TIMED_OUT = SubmitOutcomeUnknown("POST http://h/api/tasks/: ReadTimeout; the whole upload had been sent")


class ScriptedClient:
    """Answers submits from a script: exceptions are raised, a string is the uid."""

    protocol = "v2"
    url = "http://user:secret@h"

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

    def submit(self, archive_path: Path, model: str) -> str:
        self.calls += 1
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def submit(client, fake: FakeTime | None = None, deadline: float = 3600.0) -> str:
    fake = fake or FakeTime()
    steady = dict(factor=2.0, jitter=0.0)
    return submit_with_retry(
        client, Path("input.tar"), "m", deadline_seconds=deadline, sleep=fake.sleep, clock=fake.clock,
        backoff=Backoff(initial=2.0, maximum=60.0, **steady),
        internal_error_backoff=Backoff(initial=30.0, maximum=120.0, **steady),
    )


def test_what_never_reached_the_server_is_retried():
    fake = FakeTime()
    client = ScriptedClient(REFUSED, REFUSED, BAD_GATEWAY, "u1")
    assert submit(client, fake) == "u1" and client.calls == 4
    assert fake.sleeps == [2, 4, 8]


def test_what_never_reached_the_server_is_retried_until_the_deadline():
    fake = FakeTime()
    client = ScriptedClient(*[REFUSED] * 100)
    with pytest.raises(ServerUnavailable) as caught:
        submit(client, fake, deadline=30)
    assert not isinstance(caught.value, SubmitOutcomeUnknown)
    assert fake.sleeps == [2, 4, 8, 16] and client.calls == 5  # the last wait cut to the deadline


def test_a_submit_whose_outcome_is_unknown_is_never_repeated_here():
    client = ScriptedClient(TIMED_OUT, "u2")
    with pytest.raises(SubmitOutcomeUnknown) as caught:
        submit(client)
    assert caught.value is TIMED_OUT and caught.value.maybe_accepted
    assert client.calls == 1


def test_a_failure_that_may_have_reached_the_server_counts_as_an_unknown_outcome():
    maybe = ServerUnavailable("POST http://h/api/tasks/: ConnectionError: reset", maybe_accepted=True)
    client = ScriptedClient(maybe, "u3")
    with pytest.raises(SubmitOutcomeUnknown) as caught:
        submit(client)
    assert isinstance(caught.value, ServerUnavailable) and caught.value.__cause__ is maybe
    assert client.calls == 1


def test_internal_errors_are_retried_a_few_times_over_a_few_minutes_then_refused():
    fake = FakeTime()
    client = ScriptedClient(INTERNAL, REFUSED, INTERNAL, INTERNAL, INTERNAL, "never")
    with pytest.raises(SubmitRejected) as caught:
        submit(client, fake)
    assert client.calls == 5
    assert fake.sleeps == [30, 2, 60, 120]  # 500s spaced apart by their own, slower backoff
    message = str(caught.value)
    assert caught.value.status_code == 500
    assert "model 'm' at http://h (v2): the server answered 4 submits with HTTP 500 over 212s" in message
    assert "secret" not in message
    assert "answers 500 to a submit for a model it does not know" in message
    assert "Last answer: POST http://h/api/tasks/?human_readable_id=m: HTTP 500" in message


def test_a_few_internal_errors_among_successes_do_not_refuse_the_submit():
    client = ScriptedClient(INTERNAL, INTERNAL, INTERNAL, "u4")
    assert submit(client) == "u4"
