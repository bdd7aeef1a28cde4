"""`isdr run`'s study decisions (relay.studies) over a real registry and real local storage: the
record first, then every series of the study; a series left out by a stop joins the started task."""

from __future__ import annotations

from relay.fingerprints.matching import matching_fingerprints
from relay.fingerprints.model import (Destination, Fingerprint, InferenceServerRef, MatchRules, SeriesAttributes,
                                      StudyRules, StudySeries)
from relay.lifecycle import (Dispatch, Rules, StartStudy, TaskPhase, apply_dispatch, apply_start_study, next_step,
                             study_shares, study_step)
from relay.registry import SeriesRegistry
from relay.state_store import StudyStore
from relay.storage.local import LocalStorage
from relay.studies import StudyScheduler, waiting_studies
from relay.uids import SeriesKey

MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY = "1.2.826.0.1.3680043.8.498.1"
PROSTATE = Fingerprint(
    name="prostate", match=MatchRules(modality="MR"),
    inference_server=InferenceServerRef(url="http://127.0.0.1:9", model="m"),
    destinations=(Destination("127.0.0.1", 9, "PACS"),),
    study=StudyRules(series=(StudySeries("t2", MatchRules(series_description="t2")),
                             StudySeries("adc", MatchRules(series_description="adc"))), timeout_seconds=60))


def dispatched(registry, series_uid, description, study=STUDY, at=100.0):
    key = SeriesKey(series_uid, MR)
    attributes = SeriesAttributes(modality="MR", sop_class_uid=MR, series_description=description, study_uid=study)
    registry.record_instance(key, attributes, f"{series_uid}.1", at)
    state, revision = registry.read(key)
    step = next_step(state, [PROSTATE], at + 11, Rules(post_after=10), matching_fingerprints)
    assert isinstance(step, Dispatch)
    assert registry.commit(key, revision, apply_dispatch(state, step, at + 11))
    return key


def scheduler(tmp_path, registry):
    persisted, started = [], []
    studies = StudyScheduler(LocalStorage(tmp_path), registry, lambda s: persisted.append(s.key) or True,
                             lambda s: started.append(s.key))
    return studies, persisted, started


def tasks(registry, key):
    return [(task.task_id, task.phase) for task in registry.get(key).tasks]


def test_a_filled_study_is_recorded_then_told_to_every_series_persisted_and_started(tmp_path):
    registry = SeriesRegistry()
    t2, adc = dispatched(registry, "1.2.3.1", "T2"), dispatched(registry, "1.2.3.2", "ADC")
    studies, persisted, started = scheduler(tmp_path, registry)

    studies.tick([PROSTATE], now=112.0)

    (task_id, phase), = tasks(registry, t2)
    assert phase == TaskPhase.PENDING and tasks(registry, adc) == [(task_id, TaskPhase.PENDING)]
    assert [part.folder for part in StudyStore(LocalStorage(tmp_path)).load(task_id)] == ["t2", "adc"]
    assert persisted == started == sorted([t2, adc])


def test_series_of_other_studies_are_grouped_apart(tmp_path):
    registry = SeriesRegistry()
    dispatched(registry, "1.2.3.1", "T2")
    dispatched(registry, "1.2.3.2", "ADC", study="1.2.826.0.1.3680043.8.498.2")
    assert sorted(study for study, _ in waiting_studies(registry.snapshot())) == [
        STUDY, "1.2.826.0.1.3680043.8.498.2"]
    studies, persisted, _ = scheduler(tmp_path, registry)

    studies.tick([PROSTATE], now=112.0)

    assert persisted == []  # each waits for its missing entry
    assert all(phase == TaskPhase.WAITING for key in registry.keys() for _, phase in tasks(registry, key))


def test_a_series_not_told_before_a_stop_joins_the_task_its_record_names(tmp_path):
    registry = SeriesRegistry()
    t2, adc = dispatched(registry, "1.2.3.1", "T2"), dispatched(registry, "1.2.3.2", "ADC")
    # As a stop after the record and the first series left it: ADC still waits.
    state, revision = registry.read(t2)
    start = study_step(PROSTATE, STUDY, study_shares(registry.snapshot(), "prostate"), 112.0)
    assert isinstance(start, StartStudy)
    StudyStore(LocalStorage(tmp_path)).save(start.task_id, start.parts)
    registry.commit(t2, revision, apply_start_study(state, start, 112.0))
    studies, _, _ = scheduler(tmp_path, registry)

    studies.tick([PROSTATE], now=113.0)

    assert tasks(registry, adc) == [(start.task_id, TaskPhase.PENDING)] == tasks(registry, t2)


def test_a_deleted_fingerprint_fails_the_shares_that_wait_for_it(tmp_path):
    registry = SeriesRegistry()
    t2 = dispatched(registry, "1.2.3.1", "T2")
    studies, persisted, _ = scheduler(tmp_path, registry)

    studies.tick([], now=112.0)

    (task,) = registry.get(t2).tasks
    assert task.phase == TaskPhase.FAILED and "prostate is gone" in task.message and persisted == [t2]
