"""The backoff helper and the retry loop, with a fake clock (no real waiting)."""

from __future__ import annotations

import itertools

import pytest

from relay.retry import Backoff, retry_call
from tests.support.fake_time import FakeTime


class Flaky:
    """Fails with the given exceptions in turn, then returns `result`."""

    def __init__(self, failures, result="ok", fake_time: FakeTime | None = None, cost: float = 0.0):
        self.failures = list(failures)
        self.result = result
        self.calls = 0
        self.fake_time, self.cost = fake_time, cost

    def __call__(self):
        self.calls += 1
        if self.fake_time is not None:
            self.fake_time.now += self.cost
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_backoff_grows_by_factor_up_to_the_cap():
    backoff = Backoff(initial=1.0, factor=2.0, maximum=10.0, jitter=0.0)
    delays = list(itertools.islice(backoff, 7))
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_backoff_base_delay_does_not_overflow_after_many_attempts():
    assert Backoff(initial=0.5, maximum=60.0).base_delay(100000) == 60.0


def test_backoff_jitter_spreads_within_bounds_and_never_exceeds_the_cap():
    low = Backoff(initial=10.0, maximum=100.0, jitter=0.2, random=lambda: 0.0)
    high = Backoff(initial=10.0, maximum=100.0, jitter=0.2, random=lambda: 0.999999)
    assert low.delay(0) == pytest.approx(8.0)
    assert high.delay(0) == pytest.approx(12.0, rel=1e-5)
    assert high.delay(50) == 100.0  # the cap is a hard upper bound


def test_each_iteration_starts_again_from_the_initial_delay():
    backoff = Backoff(initial=1.0, factor=3.0, maximum=100.0, jitter=0.0)
    first = iter(backoff)
    assert [next(first), next(first), next(first)] == [1.0, 3.0, 9.0]
    assert next(iter(backoff)) == 1.0


@pytest.mark.parametrize(
    "kwargs", [{"initial": -1}, {"factor": 0.5}, {"jitter": 1.0}, {"jitter": -0.1}, {"maximum": -2}]
)
def test_backoff_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_retry_call_returns_after_transient_failures_with_growing_waits():
    fake = FakeTime()
    fn = Flaky([ConnectionError("a"), ConnectionError("b")], result=42)
    seen = []
    result = retry_call(
        fn,
        retry_on=ConnectionError,
        deadline=100,
        backoff=Backoff(initial=1, factor=2, maximum=30, jitter=0),
        sleep=fake.sleep,
        clock=fake.clock,
        on_retry=lambda exc, attempt, delay: seen.append((str(exc), attempt, delay)),
    )
    assert result == 42
    assert fn.calls == 3
    assert fake.sleeps == [1, 2]
    assert seen == [("a", 1, 1), ("b", 2, 2)]


def test_retry_call_does_not_retry_other_exceptions():
    fake = FakeTime()
    fn = Flaky([ValueError("permanent")])
    with pytest.raises(ValueError, match="permanent"):
        retry_call(fn, retry_on=ConnectionError, deadline=100, sleep=fake.sleep, clock=fake.clock)
    assert fn.calls == 1
    assert fake.sleeps == []


def test_retry_call_gives_up_at_the_deadline_after_a_final_attempt_there():
    fake = FakeTime()
    fn = Flaky([ConnectionError(str(i)) for i in range(100)])
    with pytest.raises(ConnectionError) as caught:
        retry_call(
            fn,
            retry_on=ConnectionError,
            deadline=20,
            backoff=Backoff(initial=4, factor=2, maximum=100, jitter=0),
            sleep=fake.sleep,
            clock=fake.clock,
        )
    # 4 + 8 = 12, then the 16 s wait is cut to the 8 s left: one last try exactly at the deadline.
    assert fake.sleeps == [4, 8, 8]
    assert fn.calls == 4
    assert fake.now - 1000.0 == 20
    assert any("gave up after 4 attempt(s)" in note for note in caught.value.__notes__)


def test_retry_call_counts_the_time_spent_in_the_calls_against_the_deadline():
    fake = FakeTime()
    fn = Flaky([TimeoutError() for _ in range(100)], fake_time=fake, cost=10)
    with pytest.raises(TimeoutError):
        retry_call(
            fn,
            retry_on=TimeoutError,
            deadline=25,
            backoff=Backoff(initial=1, factor=1, maximum=1, jitter=0),
            sleep=fake.sleep,
            clock=fake.clock,
        )
    # calls at 0-10, 11-21, 22-32: the third ends past the deadline, so no fourth.
    assert fn.calls == 3


def test_retry_call_max_attempts():
    fake = FakeTime()
    fn = Flaky([OSError("x")] * 5)
    with pytest.raises(OSError):
        retry_call(fn, retry_on=OSError, max_attempts=3, sleep=fake.sleep, clock=fake.clock)
    assert fn.calls == 3
    assert len(fake.sleeps) == 2


def test_retry_call_retry_on_accepts_a_tuple():
    fake = FakeTime()
    fn = Flaky([OSError(), KeyError()], result="done")
    assert retry_call(fn, retry_on=(OSError, KeyError), max_attempts=5, sleep=fake.sleep, clock=fake.clock) == "done"


def test_retry_call_schedule_spaces_each_kind_of_failure_by_its_own_backoff():
    fake = FakeTime()
    fn = Flaky([OSError("a"), KeyError("b"), OSError("c"), KeyError("d")], result="done")
    slow, fast = Backoff(initial=30, factor=2, jitter=0), Backoff(initial=1, factor=2, jitter=0)
    result = retry_call(fn, retry_on=(OSError, KeyError), deadline=1000, sleep=fake.sleep, clock=fake.clock,
                        schedule=lambda exc: slow if isinstance(exc, KeyError) else fast)
    assert result == "done"
    assert fake.sleeps == [1, 30, 2, 60]  # each backoff grows only with its own failures


def test_retry_call_schedule_may_stop_the_retries_by_raising():
    fake = FakeTime()
    fn = Flaky([OSError("a"), OSError("b")])

    def schedule(exc):
        raise ValueError(f"not again after {exc}")

    with pytest.raises(ValueError, match="not again after a"):
        retry_call(fn, retry_on=OSError, deadline=100, sleep=fake.sleep, clock=fake.clock, schedule=schedule)
    assert fn.calls == 1 and fake.sleeps == []
