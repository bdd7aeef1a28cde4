"""One active operator: kopf's peering rule as the operator applies it to all it does
(isdr_operator.peering), and the scheduler that takes no step while the gate is closed."""

from __future__ import annotations

import datetime
import threading

from isdr_operator.peering import Gate, own_identity, verdict
from isdr_operator.scheduler import Scheduler

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def seen(seconds_ago: float, priority: int = 0, lifetime: int = 60) -> dict:
    when = NOW - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": when.isoformat()}


def test_an_operator_alone_in_the_peering_is_active():
    assert verdict({"me": seen(5)}, "me", 0, NOW).active


def test_an_operator_is_not_active_before_its_own_keep_alive_is_there_for_others_to_see():
    result = verdict({}, "me", 0, NOW)
    assert not result.active and "own keep-alive" in result.reason
    assert not verdict(None, "me", 0, NOW).active


def test_an_operator_whose_own_keep_alive_expired_pauses():
    assert not verdict({"me": seen(61)}, "me", 0, NOW).active


def test_two_operators_of_the_same_priority_both_pause():
    status = {"a": seen(1), "b": seen(30)}
    for identity in ("a", "b"):
        result = verdict(status, identity, 0, NOW)
        assert not result.active and "same priority" in result.reason


def test_a_peer_of_higher_priority_pauses_this_one_and_not_the_other_way_round():
    status = {"deployed": seen(1), "debugger": seen(1, priority=100)}  # e.g. `kopf freeze`
    paused = verdict(status, "deployed", 0, NOW)
    assert not paused.active and "debugger" in paused.reason
    assert verdict(status, "debugger", 100, NOW).active


def test_dead_peers_and_malformed_entries_do_not_hold_anyone_back():
    status = {"me": seen(1), "crashed": seen(120), "junk": "not a dict", "odd": {"lastseen": "yesterday"}}
    assert verdict(status, "me", 0, NOW).active


def test_the_identity_is_the_pod_name_when_the_chart_gives_it():
    assert own_identity({"POD_ID": "isdr-operator-5d9c7-abcde"}) == "isdr-operator-5d9c7-abcde"
    assert own_identity({}) != own_identity({})


def test_the_gate_opens_and_closes_with_the_peering_and_reports_each_flip():
    status = {}
    flips = []
    gate = Gate(read_status=lambda: status, identity="me", now=lambda: NOW)
    gate.on_change(flips.append)
    assert not gate.check()
    status["me"] = seen(1)
    assert gate.check() and gate.is_open
    status["other"] = seen(1)
    assert not gate.check()
    del status["other"]
    assert gate.check()
    assert flips == [True, False, True]


def test_the_gate_stays_closed_when_the_peering_cannot_be_read_or_catching_up_fails():
    def unreadable():
        raise OSError("API unreachable")

    gate = Gate(read_status=unreadable, identity="me", now=lambda: NOW)
    assert not gate.check() and "cannot read" in gate.reason
    gate = Gate(read_status=lambda: None, identity="me", now=lambda: NOW)
    assert not gate.check() and "does not exist" in gate.reason

    attempts = []

    def catch_up(active):
        attempts.append(active)
        if len(attempts) == 1:
            raise RuntimeError("the API went away while listing")

    gate = Gate(read_status=lambda: {"me": seen(1)}, identity="me", now=lambda: NOW)
    gate.on_change(catch_up)
    assert not gate.check() and not gate.is_open
    assert gate.check() and attempts == [True, True]


class CountingGate:
    """A gate the test opens by hand; counts how often the scheduler asked it."""

    def __init__(self):
        self.opened = threading.Event()
        self.asked = 0
        self.asked_twice = threading.Event()

    def wait_open(self, timeout=None):
        self.asked += 1
        if self.asked >= 2:
            self.asked_twice.set()
        return self.opened.wait(min(timeout or 0.01, 0.01))


def test_the_scheduler_takes_no_step_while_the_gate_is_closed():
    steps, stepped = [], threading.Event()

    def step(name):
        steps.append(name)
        stepped.set()

    gate = CountingGate()
    scheduler = Scheduler(step, gate=gate)
    scheduler.start()
    try:
        scheduler.poke("series-a")
        assert gate.asked_twice.wait(5)  # the due step waited at the closed gate, twice over
        assert steps == []
        assert scheduler.health(stuck_after=60)["active"] is False
        gate.opened.set()
        assert stepped.wait(5)
    finally:
        scheduler.stop()
    assert steps == ["series-a"]
