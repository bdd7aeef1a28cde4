"""The durable state documents: what is written is read back, and older documents still read."""

from __future__ import annotations

import json

from relay.fingerprints.model import SeriesAttributes
from relay.lifecycle import Dispatched, SeriesPhase, SeriesState, TaskPhase, TaskState
from relay.state_store import DispatchStore, SeriesStore, StateWrites, TaskStore, series_from_dict
from relay.storage.base import StorageError, StorageFull
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey

KEY = SeriesKey("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")
CT = SeriesAttributes(modality="CT", sop_class_uid=KEY.sop_class_uid, series_description="Head")


def test_a_series_document_reads_back_as_it_was_written(tmp_path):
    store = SeriesStore(LocalStorage(tmp_path))
    task = TaskState("t-1", "ct", 2, phase=TaskPhase.RUNNING, inference_uid="-Ab_9", unknown_submits=1,
                     delivered={"PACS@h:104": ("1.1",)})
    series = SeriesState(key=KEY, attributes=CT, phase=SeriesPhase.DISPATCHED, first_received=1.0,
                         last_received=2.0, generation=2, arrivals_seen=2.0,
                         dispatches=(Dispatched(1, ("1.1",), 3.0), Dispatched(2, ("1.1", "1.2"), 4.0)),
                         tasks=(task,))
    store.save(series)
    (loaded,) = store.load_all()
    assert loaded == series and loaded.phase is SeriesPhase.DISPATCHED and loaded.tasks[0].phase is TaskPhase.RUNNING


def test_a_document_written_before_dispatches_were_kept_per_generation_still_reads():
    old = {"key": {"series_uid": KEY.series_uid, "sop_class_uid": KEY.sop_class_uid},
           "attributes": {"modality": "CT", "sop_class_uid": KEY.sop_class_uid}, "phase": "Dispatched",
           "first_received": 1.0, "last_received": 5.0, "instance_count": 2, "generation": 1,
           "dispatched_instances": ["1.1", "1.2"], "late_instances": 0, "version": 1,
           "tasks": [{"task_id": "t", "fingerprint": "ct", "generation": 1, "phase": "Running",
                      "inference_uid": "u", "submitted_at": 6.0, "delivered": {}, "message": "", "updated_at": 6.0}]}
    series = series_from_dict(json.loads(json.dumps(old)))
    assert series.instances_of(1) == ("1.1", "1.2") and series.arrivals_seen == 5.0
    assert series.tasks[0].inference_uid == "u" and series.tasks[0].unknown_submits == 0


def test_task_records_and_dispatch_records_read_back(tmp_path):
    storage = LocalStorage(tmp_path)
    TaskStore(storage, "t-1").save(TaskState("t-1", "ct", 1, phase=TaskPhase.SUCCEEDED, remote_delete_pending=True),
                                   ("1.1", "1.2"))
    task, instances = TaskStore(storage, "t-1").load()
    assert (task.phase, task.remote_delete_pending, instances) == (TaskPhase.SUCCEEDED, True, ("1.1", "1.2"))
    DispatchStore(storage).save(KEY, Dispatched(1, ("1.1",), 9.0))
    assert DispatchStore(storage).load(KEY, 1) == Dispatched(1, ("1.1",), 9.0)
    assert DispatchStore(storage).load_all(KEY) == (Dispatched(1, ("1.1",), 9.0),)
    assert DispatchStore(storage).load(KEY, 2) is None


def test_state_is_written_below_the_free_space_reserve_that_stops_receiving(tmp_path):
    storage = LocalStorage(tmp_path, min_free_bytes=2**62)  # always "below the reserve"
    try:
        storage.put_bytes("series/1/2/3.dcm", b"DICM")
    except StorageFull:
        pass
    else:
        raise AssertionError("an instance was stored below the reserve")
    SeriesStore(storage).save(SeriesState(key=KEY, attributes=CT))
    assert len(SeriesStore(storage).load_all()) == 1


def test_refused_writes_are_reported_when_they_start_and_when_they_end(caplog):
    writes, attempts = StateWrites(), []

    def write():
        attempts.append(1)
        if len(attempts) <= 3:
            raise StorageFull("No space left on device")

    with caplog.at_level("ERROR", logger="relay.state"):
        assert not writes.attempt(write, "series x") and writes.failing
        assert writes.until_done(write, "series x", should_stop=lambda: False, sleep=lambda s: None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "cannot save the state of series x" in lines[0]
    assert "can be saved again" in lines[1] and "3 writes were refused" in lines[1] and not writes.failing


def test_retrying_a_refused_write_stops_when_asked():
    def write():
        raise StorageError("bucket unreachable")

    assert not StateWrites().until_done(write, "task t", should_stop=lambda: True, sleep=lambda s: None)
