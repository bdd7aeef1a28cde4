"""The study rules: the series of one study that a study-level fingerprint posts together. Plain
data in, the next step out, for both `isdr run` and the operator."""

from dataclasses import replace

from relay.fingerprints.matching import matching_fingerprints, study_entry
from relay.fingerprints.model import (Destination, Fingerprint, InferenceServerRef, MatchRules, SeriesAttributes,
                                      StudyRules, StudySeries)
from relay.lifecycle import (Dispatch, FailStudy, Rules, SeriesPhase, StartStudy, TaskPhase, Wait, apply_dispatch,
                             apply_fail_study, apply_reopen, apply_start_study, next_step, on_instance, study_note,
                             study_shares, study_step, study_task_id, update_task)
from relay.uids import SeriesKey

MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY, OTHER_STUDY = "1.2.3", "1.2.4"
RULES = Rules(post_after=10)


def prostate(timeout=60.0, on_timeout="fail", **match):
    return Fingerprint(
        name="prostate", match=MatchRules(**match),
        inference_server=InferenceServerRef(url="http://is", model="m"),
        destinations=(Destination("pacs", 104, "PACS"),),
        study=StudyRules(series=(StudySeries("t2", MatchRules(series_description="t2")),
                                 StudySeries("adc", MatchRules(series_description="adc"))),
                         timeout_seconds=timeout, on_timeout=on_timeout))


def series_level():
    return Fingerprint(name="all-mr", match=MatchRules(modality="MR"),
                       inference_server=InferenceServerRef(url="http://is", model="m2"))


def received(series_uid, description, study=STUDY, uids=("9.1", "9.2"), at=100.0):
    key = SeriesKey(series_uid, MR)
    attributes = SeriesAttributes(modality="MR", sop_class_uid=MR, series_description=description,
                                  study_uid=study)
    series = None
    for uid in uids:
        series = on_instance(series, key, attributes, f"{series_uid}.{uid}", at)
    return series


def dispatched(series, at, fingerprints=None):
    decision = next_step(series, fingerprints or [prostate()], at, RULES, matching_fingerprints)
    assert isinstance(decision, Dispatch), decision
    return apply_dispatch(series, decision, at)


def decide(members, now, fingerprint=None, started=None):
    fingerprint = fingerprint or prostate()
    return study_step(fingerprint, STUDY, study_shares(members, fingerprint.name), now, started)


def test_a_series_fills_the_first_entry_whose_match_it_matches_and_only_with_a_study_uid():
    fp = prostate()
    assert study_entry(fp, received("1.1", "ep2d ADC").attributes) == "adc"
    assert study_entry(fp, received("1.1", "T2 tse ax").attributes) == "t2"
    assert study_entry(fp, received("1.1", "localizer").attributes) is None
    assert study_entry(fp, received("1.1", "T2", study="").attributes) is None
    assert study_entry(series_level(), received("1.1", "T2").attributes) is None


def test_spec_match_filters_every_series_of_the_study():
    fp = prostate(study_description="prostate")
    assert matching_fingerprints([fp], received("1.1", "T2").attributes) == []
    attributes = replace(received("1.1", "T2").attributes, study_description="MR Prostate")
    assert matching_fingerprints([fp], attributes) == [fp]


def test_a_complete_series_of_a_study_takes_a_waiting_share_and_runs_nothing_by_itself():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    (share,) = t2.tasks
    assert share.phase == TaskPhase.WAITING and share.entry == "t2" and t2.phase == SeriesPhase.DISPATCHED
    assert isinstance(next_step(t2, [prostate()], 112.0, RULES, matching_fingerprints), Wait)


def test_a_series_matched_at_both_levels_gets_a_series_task_and_a_share():
    t2 = dispatched(received("1.1", "T2"), at=111.0, fingerprints=[prostate(), series_level()])
    phases = {task.fingerprint: task.phase for task in t2.tasks}
    assert phases == {"all-mr": TaskPhase.PENDING, "prostate": TaskPhase.WAITING}


def test_the_study_waits_for_its_missing_entries_until_the_timeout_after_the_first_share():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    assert decide([t2], now=120.0) == Wait(until=111.0 + 60.0)


def test_every_entry_filled_starts_one_task_with_every_series_in_its_entrys_folder():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    adc = dispatched(received("1.2", "ADC", at=130.0), at=141.0)

    decision = decide([adc, t2], now=141.0)

    assert isinstance(decision, StartStudy)
    assert decision.task_id == study_task_id(STUDY, "prostate", 1)
    assert [(p.folder, p.key.series_uid, p.instances) for p in decision.parts] == [
        ("t2", "1.1", ("1.1.9.1", "1.1.9.2")), ("adc", "1.2", ("1.2.9.1", "1.2.9.2"))]
    assert decision.missing == ()
    for series in (t2, adc):
        (task,) = apply_start_study(series, decision, 141.0).tasks
        assert task.task_id == decision.task_id and task.phase == TaskPhase.PENDING and task.entry
    assert "t2 (2 instances), adc (2 instances)" in study_note(decision)


def test_the_order_in_which_the_series_arrive_does_not_matter():
    adc = dispatched(received("1.2", "ADC"), at=111.0)
    t2 = dispatched(received("1.1", "T2", at=120.0), at=131.0)
    decision = decide([t2, adc], now=131.0)
    assert isinstance(decision, StartStudy)
    assert [part.folder for part in decision.parts] == ["t2", "adc"]


def test_two_studies_never_share_a_task():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    other_adc = dispatched(received("1.2", "ADC", study=OTHER_STUDY), at=111.0)
    fp = prostate()
    assert study_shares([t2, other_adc], fp.name)  # the driver groups by study; the ids differ too
    assert decide([t2], now=120.0) == Wait(until=171.0)
    assert study_task_id(STUDY, fp.name, 1) != study_task_id(OTHER_STUDY, fp.name, 1)


def test_on_timeout_run_posts_what_is_there_and_says_what_is_missing():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    decision = decide([t2], now=171.0, fingerprint=prostate(on_timeout="run"))
    assert isinstance(decision, StartStudy)
    assert [part.folder for part in decision.parts] == ["t2"] and decision.missing == ("adc",)
    assert "posted without adc" in study_note(decision)


def test_on_timeout_fail_fails_the_waiting_shares_and_posts_nothing():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    decision = decide([t2], now=171.0)
    assert isinstance(decision, FailStudy) and "no series for adc" in decision.message
    (task,) = apply_fail_study(t2, decision, 171.0).tasks
    assert task.phase == TaskPhase.FAILED and "onTimeout: fail" in task.message


def test_a_second_series_of_one_entry_is_posted_too_in_a_folder_of_its_own():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    t2_again = dispatched(received("1.3", "T2 repeat", at=115.0), at=126.0)
    adc = dispatched(received("1.2", "ADC", at=120.0), at=131.0)
    decision = decide([adc, t2_again, t2], now=131.0)
    assert [(p.folder, p.key.series_uid) for p in decision.parts] == [("t2", "1.1"), ("t2-2", "1.3"), ("adc", "1.2")]


def test_a_late_series_after_the_study_ran_waits_for_the_studys_next_task():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    adc = dispatched(received("1.2", "ADC"), at=111.0)
    first = decide([t2, adc], now=111.0)
    t2, adc = (apply_start_study(s, first, 111.0) for s in (t2, adc))
    t2 = update_task(t2, replace(t2.tasks[0], phase=TaskPhase.SUCCEEDED))
    # ADC gets an instance after the dispatch: re-opened (LATE_INSTANCE_POLICY=reopen), dispatched again.
    adc = on_instance(adc, adc.key, adc.attributes, "1.2.9.3", 150.0)
    adc = dispatched(apply_reopen(adc, None), at=161.0)

    decision = decide([t2, adc], now=161.0)

    assert decision == Wait(until=161.0 + 60.0)  # T2 is not re-sent by itself: its entry is missing
    late = decide([t2, adc], now=221.0, fingerprint=prostate(on_timeout="run"))
    assert late.task_id == study_task_id(STUDY, "prostate", 2) != first.task_id
    assert [p.instances for p in late.parts] == [("1.2.9.1", "1.2.9.2", "1.2.9.3")]


def test_a_share_left_waiting_by_a_stop_joins_the_task_its_record_names():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    adc = dispatched(received("1.2", "ADC"), at=111.0)
    start = decide([t2, adc], now=111.0)
    t2 = apply_start_study(t2, start, 111.0)  # ... and the driver stopped before telling ADC

    again = decide([t2, adc], now=112.0, started={start.task_id: start.parts})

    assert isinstance(again, StartStudy) and again.joined and again.task_id == start.task_id
    assert [key.series_uid for key, _ in again.shares] == ["1.2"]


def test_a_new_dispatch_of_a_waiting_series_replaces_its_share():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    t2 = on_instance(t2, t2.key, t2.attributes, "1.1.9.3", 115.0)
    t2 = dispatched(apply_reopen(t2, None), at=126.0)
    (share,) = t2.tasks
    assert share.phase == TaskPhase.WAITING and share.generation == 2


def test_a_deleted_fingerprint_fails_its_waiting_shares():
    t2 = dispatched(received("1.1", "T2"), at=111.0)
    decision = study_step(None, STUDY, study_shares([t2], "prostate"), 112.0)
    assert isinstance(decision, FailStudy) and "prostate is gone" in decision.message
