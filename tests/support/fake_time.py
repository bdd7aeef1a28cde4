"""A clock for rules that wait: time moves only when the code under test sleeps."""

from __future__ import annotations


class FakeTime:
    """An epoch clock that only moves when the loop sleeps (or a fake call takes time)."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds
