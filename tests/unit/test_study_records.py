"""The record of a study task (state/studies/<task id>.json): what it sends, written before any
series is told, read by the task (a worker of `isdr run` or a Job's pod)."""

from __future__ import annotations

from relay.lifecycle import StudyPart, StudyShare, TaskPhase, TaskState
from relay.state_store import SeriesStore, StudyStore
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey

MR = "1.2.840.10008.5.1.4.1.1.4"
T2, ADC = SeriesKey("1.2.3.1", MR), SeriesKey("1.2.3.2", MR)
PARTS = (StudyPart("t2", T2, 1, ("1.2.3.1.1", "1.2.3.1.2")), StudyPart("adc", ADC, 2, ("1.2.3.2.1",)))


def share(key, task_id, phase):
    return StudyShare(key, TaskState(task_id=task_id, fingerprint="prostate", generation=1, phase=phase,
                                     entry="t2"), 0.0, ())


def test_a_study_record_keeps_its_parts_in_order(tmp_path):
    store = StudyStore(LocalStorage(tmp_path))
    store.save("prostate-abc-s1", PARTS)
    assert store.load("prostate-abc-s1") == PARTS
    assert store.load("prostate-abc-s2") is None
    store.delete("prostate-abc-s1")
    assert store.load("prostate-abc-s1") is None


def test_only_the_records_of_started_unfinished_tasks_are_offered_to_join(tmp_path):
    store = StudyStore(LocalStorage(tmp_path))
    store.save("running-s1", PARTS)
    store.save("done-s2", PARTS)
    shares = [share(T2, "running-s1", TaskPhase.RUNNING), share(ADC, "done-s2", TaskPhase.SUCCEEDED),
              share(ADC, "adc-waiting-3", TaskPhase.WAITING)]
    assert store.started(shares) == {"running-s1": PARTS}


def test_a_study_record_is_not_a_series_document(tmp_path):
    storage = LocalStorage(tmp_path)
    StudyStore(storage).save("prostate-abc-s1", PARTS)
    assert SeriesStore(storage).load_all() == []
