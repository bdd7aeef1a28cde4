"""`isdr run`'s scheduler loop in one process: read, ask the rules, persist, carry out.

The receiver's `instance_stored` must never wait for matching or storage, a decision must never
leave out an instance that arrived while it was being made, and a state write that storage
refuses (a full disk) delays a series without wedging it. Real local storage, a real registry;
the matcher and the storage are wrapped where a test needs them slow or full.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import pytest

from relay.config import Settings
from relay.fingerprints.model import Destination, Fingerprint, InferenceServerRef, MatchRules, SeriesAttributes
from relay.lifecycle import SeriesPhase, TaskPhase
from relay.runner import Relay
from relay.storage.base import StorageFull
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey

KEY = SeriesKey("1.2.826.0.1.3680043.8.498.7", "1.2.840.10008.5.1.4.1.1.2")
CT = SeriesAttributes(modality="CT", sop_class_uid=KEY.sop_class_uid)
FINGERPRINT = Fingerprint(name="ct", match=MatchRules(modality="CT"),
                          inference_server=InferenceServerRef(url="http://127.0.0.1:9", model="m"),
                          destinations=(Destination("127.0.0.1", 9, "PACS"),))
DEADLOCK = 20.0  # seconds: only a hang takes this long


class FullWhenAsked(LocalStorage):
    """Local storage whose state writes fail with a full disk while `full` is set."""

    full = False

    def put_state(self, key, data):
        if self.full:
            raise StorageFull("No space left on device (test)")
        super().put_state(key, data)


@pytest.fixture
def relay(tmp_path):
    storage = FullWhenAsked(tmp_path / "data")
    made = Relay(Settings(incoming_dir=tmp_path / "data", fingerprint_dir=tmp_path / "fps", post_after=10),
                 storage=storage)
    made.fingerprints.refresh = lambda: (FINGERPRINT,)
    made.started = []
    made._start_task = lambda key, task: made.started.append(task.task_id) or True
    yield made
    made._pool.shutdown(wait=False)


def arrive(relay, uid: str, at: float) -> None:
    """What the receiver does: the instance is durable, then the sink is told."""
    relay.storage.put_bytes(KEY.instance_key(uid), b"DICM")
    relay.registry.record_instance(KEY, CT, uid, at)


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def assert_receiver_not_blocked(relay, entered: threading.Event, release: threading.Event, now: float,
                                what: str) -> None:
    """While a tick is stuck in something slow, an instance is stored and registered at once."""
    scheduler = in_thread(lambda: relay.tick(now=now))
    assert entered.wait(DEADLOCK)
    receiver = in_thread(lambda: arrive(relay, "1.2", now))
    receiver.join(DEADLOCK)
    assert not receiver.is_alive(), f"instance_stored waited for {what}"
    release.set()
    scheduler.join(DEADLOCK)


def test_a_slow_matcher_never_blocks_the_receiver(relay):
    entered, release = threading.Event(), threading.Event()

    def slow_matcher(fingerprints, attributes):
        entered.set()
        release.wait(DEADLOCK)  # a fingerprint expression taking its time
        return list(fingerprints)

    relay.matcher = slow_matcher
    arrive(relay, "1.1", 100.0)
    assert_receiver_not_blocked(relay, entered, release, 200.0, "the matcher")


def test_slow_storage_deletes_never_block_the_receiver(relay):
    arrive(relay, "1.1", 100.0)
    relay.tick(now=200.0)
    (task,) = relay.registry.get(KEY).tasks
    relay.registry.task_changed(KEY, replace(task, phase=TaskPhase.SUCCEEDED))
    relay.tick(now=201.0)  # finished; the clean-up is next
    entered, release = threading.Event(), threading.Event()
    original = relay.storage.delete

    def slow_delete(keys):
        keys = list(keys)
        if any(key.startswith(KEY.prefix) for key in keys):
            entered.set()
            release.wait(DEADLOCK)  # a network file system or a bucket taking its time
        return original(keys)

    relay.storage.delete = slow_delete
    assert_receiver_not_blocked(relay, entered, release, 202.0, "a storage delete")
    assert relay.storage.exists(KEY.instance_key("1.2"))  # the late one was not part of the dispatch


def test_an_instance_arriving_while_the_series_is_decided_is_never_left_out(relay):
    def matcher_with_an_arrival(fingerprints, attributes):
        if relay.registry.get(KEY).instance_count == 1:
            arrive(relay, "1.2", 199.0)  # stored after the listing the decision is based on
        return list(fingerprints)

    relay.matcher = matcher_with_an_arrival
    arrive(relay, "1.1", 100.0)
    relay.tick(now=200.0)
    assert relay.registry.get(KEY).phase == SeriesPhase.RECEIVING  # the decision was dropped

    relay.tick(now=210.0)
    series = relay.registry.get(KEY)
    assert series.phase == SeriesPhase.DISPATCHED and series.instances_of(1) == ("1.1", "1.2")


def test_a_full_disk_delays_the_dispatch_and_it_goes_on_by_itself_once_space_is_back(relay, caplog):
    arrive(relay, "1.1", 100.0)
    relay.storage.full = True
    with caplog.at_level(logging.ERROR, logger="relay.state"):
        relay.tick(now=200.0)
        relay.tick(now=201.0)
        assert relay.started == [] and relay.series_store.load_all() == []
        starts = [r for r in caplog.records if "cannot save the state" in r.getMessage()]
        assert len(starts) == 1  # once when it starts, not at every try

        relay.storage.full = False
        relay.tick(now=202.0)
    assert [r.levelname for r in caplog.records if "can be saved again" in r.getMessage()] == ["ERROR"]
    (saved,) = relay.series_store.load_all()
    assert saved.phase == SeriesPhase.DISPATCHED and len(relay.started) == 1


def test_a_restart_resumes_from_the_documents_and_reconciles_with_storage(relay, tmp_path):
    arrive(relay, "1.1", 100.0)
    relay.tick(now=200.0)
    arrive(relay, "1.2", 250.0)  # after the dispatch; then the relay is killed
    again = Relay(relay.settings, storage=relay.storage)
    again.fingerprints.refresh = lambda: (FINGERPRINT,)
    again.started = []
    again._start_task = lambda key, task: again.started.append(task.task_id) or True
    try:
        again.recover()
        series = again.registry.get(KEY)
        assert series.received == frozenset({"1.1", "1.2"}) and series.generation == 1
        assert again.started == [series.tasks[0].task_id]  # resumed
        again.tick(now=series.last_received + 1)
        assert again.registry.get(KEY).phase == SeriesPhase.RECEIVING  # the new instance re-opened it
    finally:
        again._pool.shutdown(wait=False)


def test_a_free_worker_takes_the_waiting_task_of_the_highest_priority_first(tmp_path):
    relay = Relay(Settings(incoming_dir=tmp_path / "data", fingerprint_dir=tmp_path / "fps", workers=1),
                  storage=LocalStorage(tmp_path / "data"))
    ran, first_started, release = [], threading.Event(), threading.Event()

    def run(key, task_id):
        ran.append(task_id)
        first_started.set()
        assert release.wait(DEADLOCK)

    relay._run_task = run
    try:
        relay._enqueue(KEY, "routine-1", 0)  # takes the only worker
        assert first_started.wait(DEADLOCK)
        for task_id, priority in (("routine-2", 0), ("stroke-1", 100), ("research", -5), ("stroke-2", 100)):
            relay._enqueue(KEY, task_id, priority)
        release.set()
    finally:
        relay._pool.shutdown(wait=True)

    assert ran == ["routine-1", "stroke-1", "stroke-2", "routine-2", "research"]


def test_a_cancel_is_answered_at_once_and_its_request_kept_until_its_task_is_recorded_as_ended(relay):
    from relay.admin_requests import Request, RequestStore
    from relay.lifecycle import AdminAction

    arrive(relay, "1.1", 100.0)
    relay.tick(now=200.0)  # dispatched: one task, running
    (task,) = relay.registry.get(KEY).tasks
    enqueued = []
    relay._enqueue = lambda key, task_id, priority: enqueued.append(task_id)
    requests = RequestStore(relay.storage)
    request = Request.new(AdminAction.CANCEL, KEY.series_uid, None, 201.0)
    requests.ask(request)

    relay.tick(now=201.0)

    answer = requests.answer_to(request.id)
    assert answer.accepted and answer.message == f"cancelling task(s) {task.task_id}"
    assert enqueued == [task.task_id] and task.task_id in relay._cancelled
    assert [r.id for r in requests.pending()] == [request.id], "kept: a restart now would cancel it again"
    relay.tick(now=202.0)
    assert [r.id for r in requests.pending()] == [request.id] and enqueued == [task.task_id]

    relay.registry.task_changed(KEY, replace(task, phase=TaskPhase.FAILED))  # what the worker records
    relay.tick(now=203.0)

    assert requests.pending() == [] and requests.answer_to(request.id) is None
