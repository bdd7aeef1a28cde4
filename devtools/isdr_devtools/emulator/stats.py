"""Counters that tests read from GET /_emulator/stats, and the injected submit failures."""

from __future__ import annotations

import threading
from collections import Counter


class Stats:
    def __init__(self, fail_submits: int = 0):
        self._lock = threading.Lock()
        self._initial_fail_submits = fail_submits
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.submits = 0
            self.submits_by_model: Counter[str] = Counter()
            self.rejected_submits = 0
            self.injected_submit_failures = 0
            self.polls = 0
            self.poll_answers: Counter[int] = Counter()
            self.deletes = 0
            self.delete_answers: Counter[int] = Counter()
            # A reset re-arms --fail-submits: the emulator is as fresh as at start.
            self._fail_submits_left = self._initial_fail_submits

    def take_injected_failure(self) -> bool:
        """True (and one fewer left) while --fail-submits failures remain."""
        with self._lock:
            if self._fail_submits_left > 0:
                self._fail_submits_left -= 1
                self.injected_submit_failures += 1
                self.rejected_submits += 1
                return True
            return False

    def accepted(self, model: str) -> None:
        with self._lock:
            self.submits += 1
            self.submits_by_model[model] += 1

    def rejected(self) -> None:
        with self._lock:
            self.rejected_submits += 1

    def polled(self, code: int) -> None:
        with self._lock:
            self.polls += 1
            self.poll_answers[code] += 1

    def deleted(self, code: int) -> None:
        with self._lock:
            self.deletes += 1
            self.delete_answers[code] += 1

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "submits": self.submits,
                "submits_by_model": dict(self.submits_by_model),
                "rejected_submits": self.rejected_submits,
                "injected_submit_failures": self.injected_submit_failures,
                "fail_submits_left": self._fail_submits_left,
                "polls": self.polls,
                "poll_answers": {str(k): v for k, v in sorted(self.poll_answers.items())},
                "deletes": self.deletes,
                "delete_answers": {str(k): v for k, v in sorted(self.delete_answers.items())},
            }
