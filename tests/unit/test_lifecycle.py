"""The series life-cycle rules: plain data in, the next step out. Every rule of the life cycle is
here, for both `isdr run` and the operator."""

from dataclasses import replace

import pytest

from relay.fingerprints.model import (Destination, Fingerprint, InferenceServerRef, MatchRules,
                                      SeriesAttributes)
from relay.lifecycle import (Cleanup, Dispatch, DropUnmatched, Finish, Forget, JobOutcome, LatePolicy,
                             ListStorage, NoteArrivals, PendingTaskAction, Reopen, Rules, SeriesPhase, SubmitDecision,
                             TaskPhase, TaskState, Wait, accept_task_phase, apply_cleanup, apply_dispatch,
                             apply_finish, apply_note_arrivals, apply_reopen, arrivals_note, new_series,
                             next_step, on_instance, pending_task_action, progress, submit_decision, task_id, task_phase_from_job,
                             update_task, with_stored)
from relay.uids import SeriesKey

KEY = SeriesKey("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2")
CT = SeriesAttributes(modality="CT", sop_class_uid=KEY.sop_class_uid, series_description="Head")
RULES = Rules(post_after=10, delete_on_post=True)


def fingerprint(name, modality=""):
    return Fingerprint(name=name, match=MatchRules(modality=modality),
                       inference_server=InferenceServerRef(url="http://is", model="m"),
                       destinations=(Destination("pacs", 104, "PACS"),))


def match_modality(fingerprints, attributes):
    return [fp for fp in fingerprints if fp.match.modality in ("", attributes.modality)]


def received(*uids, at=100.0):
    series = None
    for uid in uids or ("1.1",):
        series = on_instance(series, KEY, CT, uid, at)
    return series


def step(series, now, rules=RULES, fingerprints=(fingerprint("a"),)):
    return next_step(series, list(fingerprints), now, rules, match_modality)


def dispatched(*names, uids=("1.1", "1.2"), at=111.0):
    series = received(*uids)
    decision = step(series, at, fingerprints=[fingerprint(n) for n in names])
    assert isinstance(decision, Dispatch)
    return apply_dispatch(series, decision, at)


def finish_tasks(series, phase=TaskPhase.SUCCEEDED):
    for task in series.tasks:
        series = update_task(series, replace(task, phase=phase))
    return series


def finished(now=200.0, **kwargs):
    series = finish_tasks(dispatched("a", **kwargs))
    return apply_finish(series, step(series, now), now)


# --- receiving and dispatch --------------------------------------------------------------------


def test_an_arrival_is_only_a_fact_about_the_series():
    series = received("1.1", "1.2", at=100.0)
    series = on_instance(series, KEY, CT, "1.1", 105.0)  # the same instance again
    assert (series.phase, series.received, series.instance_count) == (SeriesPhase.RECEIVING,
                                                                     frozenset({"1.1", "1.2"}), 2)
    assert (series.first_received, series.last_received) == (100.0, 105.0)


def test_more_instances_push_completion_back():
    series = on_instance(received(at=100.0), KEY, CT, "1.2", 105.0)
    assert step(series, 114.9) == Wait(until=115.0)


def test_a_quiet_series_is_dispatched_with_every_stored_instance_to_every_matching_fingerprint():
    fps = [fingerprint("zeta"), fingerprint("alpha", "CT"), fingerprint("mr-only", "MR")]
    decision = step(received("1.2", "1.1"), 110.0, fingerprints=fps)
    assert decision == Dispatch(fingerprints=("alpha", "zeta"), generation=1, instances=("1.1", "1.2"))


def test_the_dispatch_sends_what_storage_holds_not_what_a_count_says():
    counted = replace(received("1.1"), received=None, instance_count=2)  # e.g. from a DicomSeries
    assert step(counted, 110.0) == ListStorage()
    listed = with_stored(counted, ["1.1", "1.2", "1.3"], newest=99.0)
    assert step(listed, 110.0).instances == ("1.1", "1.2", "1.3")


def test_a_stored_instance_newer_than_the_state_knows_delays_the_dispatch():
    # A receiver killed before it could publish its last instances: storage tells.
    listed = with_stored(replace(received(at=100.0), received=None), ["1.1", "1.2"], newest=105.0)
    assert step(listed, 110.0) == Wait(until=115.0)


def test_a_quiet_series_without_a_match_is_dropped_with_exactly_its_listed_instances():
    decision = step(received("1.1", "1.2"), 110.0, fingerprints=[fingerprint("mr", "MR")])
    assert decision == DropUnmatched(instances=("1.1", "1.2"))


def test_a_series_with_nothing_left_in_storage_is_forgotten_without_a_dispatch():
    empty = with_stored(received("1.1"), [], None)
    assert step(empty, 110.0) == Forget(delete=())


def test_dispatch_creates_one_pending_task_per_fingerprint_with_deterministic_ids():
    series = dispatched("a", "b")
    assert series.phase == SeriesPhase.DISPATCHED and series.instances_of(1) == ("1.1", "1.2")
    assert [t.task_id for t in series.tasks] == [task_id(KEY, "a", 1), task_id(KEY, "b", 1)]
    assert all(t.phase == TaskPhase.PENDING for t in series.tasks)
    assert task_id(KEY, "a", 1) == task_id(KEY, "a", 1) != task_id(KEY, "a", 2)


def test_task_id_is_a_dns_label_even_for_odd_fingerprint_names():
    ident = task_id(KEY, "CT_Organs At Risk (v2)!" * 5, 3)
    assert len(ident) <= 63 and ident.replace("-", "").isalnum() and ident == ident.lower()


# --- finishing and cleaning up -------------------------------------------------------------------


def test_a_dispatched_series_waits_for_its_tasks():
    series = dispatched("a", "b")
    series = update_task(series, replace(series.tasks[0], phase=TaskPhase.SUCCEEDED))
    assert step(series, 500.0) == Wait()


@pytest.mark.parametrize("phases, expected", [
    ((TaskPhase.SUCCEEDED, TaskPhase.SUCCEEDED), SeriesPhase.SUCCEEDED),
    ((TaskPhase.SUCCEEDED, TaskPhase.FAILED), SeriesPhase.FAILED),
])
def test_a_series_finishes_when_every_task_has(phases, expected):
    series = dispatched("a", "b")
    for task, phase in zip(series.tasks, phases):
        series = update_task(series, replace(task, phase=phase))
    assert step(series, 500.0) == Finish(phase=expected)


def test_cleanup_deletes_only_the_dispatched_instances_and_only_after_success():
    series = finished()
    assert step(series, 201.0) == Cleanup(delete=("1.1", "1.2"))
    assert step(series, 201.0, Rules(delete_on_post=False)) == Cleanup(delete=())
    failed = apply_finish(finish_tasks(dispatched("a"), TaskPhase.FAILED), Finish(SeriesPhase.FAILED), 200.0)
    # A failed series keeps its instances, so that nothing acknowledged is lost to a model error.
    assert step(failed, 201.0) == Cleanup(delete=())


def test_a_succeeded_series_is_forgotten_only_after_the_retention():
    series = finished(now=200.0)
    series = apply_cleanup(series, step(series, 201.0))
    assert series.received == frozenset()
    assert step(series, 200.0 + RULES.forget_after - 1) == Wait(until=200.0 + RULES.forget_after)
    assert step(series, 200.0 + RULES.forget_after) == Forget(delete=())
    keep = Rules(delete_on_post=False)
    assert step(apply_cleanup(finished(), Cleanup(())), 10**9, keep) == Wait()


def test_a_series_is_not_forgotten_while_a_remote_delete_is_pending():
    series = apply_cleanup(finished(), Cleanup(("1.1", "1.2")))
    series = update_task(series, replace(series.tasks[0], remote_delete_pending=True))
    assert step(series, 10**9) == Wait()


# --- late instances ------------------------------------------------------------------------------


def test_a_new_instance_after_the_dispatch_reopens_the_series_by_default():
    series = dispatched("a", uids=("1.1", "1.2"))
    series = on_instance(series, KEY, CT, "1.3", 300.0)
    decision = step(series, 300.0)
    assert decision == Reopen(new_instances=1)
    assert "re-opened" in arrivals_note(series, decision, RULES)
    reopened = apply_reopen(series, decision)
    assert reopened.phase == SeriesPhase.RECEIVING
    assert step(reopened, 305.0) == Wait(until=310.0)
    again = step(reopened, 310.0)
    assert again == Dispatch(fingerprints=("a",), generation=2, instances=("1.1", "1.2", "1.3"))
    second = apply_dispatch(reopened, again, 310.0)
    assert [t.generation for t in second.tasks] == [1, 2] and len({t.task_id for t in second.tasks}) == 2
    assert second.instances_of(1) == ("1.1", "1.2")  # the first run still sends what it was given


def test_a_resent_instance_after_the_dispatch_is_a_duplicate_and_runs_nothing():
    series = on_instance(dispatched("a"), KEY, CT, "1.1", 300.0)
    decision = step(series, 300.0)
    assert decision == NoteArrivals(late_instances=0)
    assert "duplicates" in arrivals_note(series, decision, RULES)
    noted = apply_note_arrivals(series, decision)
    assert noted.phase == SeriesPhase.DISPATCHED and step(noted, 301.0) == Wait()


def test_a_duplicate_of_a_cleaned_up_series_is_cleaned_up_again():
    series = apply_cleanup(finished(), Cleanup(("1.1", "1.2")))
    series = on_instance(series, KEY, CT, "1.2", 300.0)
    noted = apply_note_arrivals(series, step(series, 300.0))
    assert step(noted, 301.0) == Cleanup(delete=("1.2",))


def test_the_ignore_policy_keeps_new_instances_unrun_until_the_retention():
    ignore = Rules(late_instance_policy=LatePolicy.IGNORE)
    series = on_instance(dispatched("a"), KEY, CT, "1.9", 300.0)
    decision = step(series, 300.0, ignore)
    assert decision == NoteArrivals(late_instances=1)
    assert "kept but not run" in arrivals_note(series, decision, ignore)
    series = finish_tasks(apply_note_arrivals(series, decision))
    series = apply_finish(series, step(series, 400.0, ignore), 400.0)
    cleanup = step(series, 401.0, ignore)
    assert cleanup == Cleanup(delete=("1.1", "1.2"))  # the late one is not part of a dispatch: kept
    series = apply_cleanup(series, cleanup)
    assert step(series, 400.0 + ignore.forget_after, ignore) == Forget(delete=("1.9",))


def test_the_rerun_policy_reopens_the_series_for_any_arrival_even_a_duplicate():
    rerun = Rules(late_instance_policy=LatePolicy.RERUN)
    series = on_instance(dispatched("a"), KEY, CT, "1.1", 300.0)
    assert step(series, 300.0, rerun) == Reopen(new_instances=0)


def test_arrivals_are_looked_at_once():
    series = on_instance(dispatched("a"), KEY, CT, "1.1", 300.0)
    noted = apply_note_arrivals(series, step(series, 300.0))
    assert noted.arrivals_seen == 300.0 and step(noted, 301.0) == Wait()


def test_a_time_that_went_through_a_coarser_clock_is_not_a_new_arrival():
    # The newest file's time (nanoseconds) against the same time kept in microseconds: a
    # DicomSeries' lateSeen must not make the same instances look new at every look.
    series = finished(now=200.0)
    kept = replace(series, last_received=150.000001, arrivals_seen=150.000001, received=None)
    listed = with_stored(kept, ["1.1", "1.2"], newest=150.0000014)
    assert listed.last_received == 150.000001 and step(listed, 201.0) == Cleanup(delete=("1.1", "1.2"))


def test_without_the_stored_instances_arrivals_after_a_dispatch_need_a_listing():
    series = replace(on_instance(dispatched("a"), KEY, CT, "1.3", 300.0), received=None)
    assert step(series, 300.0) == ListStorage()


def test_a_rerun_that_succeeds_supersedes_an_earlier_failure_of_the_same_fingerprint():
    series = finish_tasks(dispatched("a"), TaskPhase.FAILED)
    series = on_instance(series, KEY, CT, "1.9", 300.0)
    reopened = apply_reopen(series, step(series, 300.0))
    again = apply_dispatch(reopened, step(reopened, 400.0), 400.0)
    again = update_task(again, replace(again.tasks[1], phase=TaskPhase.SUCCEEDED))
    assert step(again, 500.0) == Finish(SeriesPhase.SUCCEEDED)


def test_a_reopened_series_that_no_longer_matches_ends_as_its_earlier_tasks_did():
    series = on_instance(finish_tasks(dispatched("a")), KEY, CT, "1.9", 300.0)
    reopened = apply_reopen(series, step(series, 300.0))
    assert step(reopened, 400.0, fingerprints=[]) == Finish(SeriesPhase.SUCCEEDED)


# --- one task --------------------------------------------------------------------------------------


def task(**changes):
    return replace(TaskState(task_id="t", fingerprint="a", generation=1), **changes)


def test_an_unknown_submit_outcome_is_repeated_at_most_once():
    assert submit_decision(task()) == SubmitDecision.SUBMIT
    assert submit_decision(task(unknown_submits=1)) == SubmitDecision.REPEAT
    assert submit_decision(task(unknown_submits=2)) == SubmitDecision.GIVE_UP


def test_a_task_needs_work_until_finished_and_its_remote_delete_is_done():
    assert task(phase=TaskPhase.RUNNING).needs_work
    assert task(phase=TaskPhase.SUCCEEDED, remote_delete_pending=True).needs_work
    assert not task(phase=TaskPhase.SUCCEEDED).needs_work and not task(phase=TaskPhase.FAILED).needs_work


@pytest.mark.parametrize("outcome, record, expected", [
    (JobOutcome.RUNNING, None, TaskPhase.PENDING),
    (JobOutcome.RUNNING, task(phase=TaskPhase.RUNNING), TaskPhase.RUNNING),
    (JobOutcome.COMPLETE, task(phase=TaskPhase.SUCCEEDED), TaskPhase.SUCCEEDED),
    (JobOutcome.FAILED, task(phase=TaskPhase.RUNNING), TaskPhase.FAILED),
    (JobOutcome.RUNNING, task(phase=TaskPhase.FAILED, message="552"), TaskPhase.FAILED),
    # Delivered, then the pod was killed during the remote delete until the Job gave up.
    (JobOutcome.FAILED, task(phase=TaskPhase.SUCCEEDED, remote_delete_pending=True), TaskPhase.SUCCEEDED),
])
def test_a_jobs_task_phase_comes_from_its_conditions_and_its_record(outcome, record, expected):
    assert task_phase_from_job(outcome, "BackoffLimitExceeded", record)[0] == expected


def test_a_failed_jobs_reason_is_added_to_the_tasks_own_message():
    phase, message = task_phase_from_job(JobOutcome.FAILED, "DeadlineExceeded: too long",
                                         task(phase=TaskPhase.RUNNING, message="polling"))
    assert (phase, message) == (TaskPhase.FAILED, "polling (DeadlineExceeded: too long)")


def test_a_pending_task_whose_fingerprint_exists_gets_its_job():
    assert pending_task_action(fingerprint_known=True) == PendingTaskAction.CREATE_JOB


def test_a_pending_task_whose_job_was_created_runs_on_after_its_fingerprint_is_deleted():
    # Pending is also a created Job whose pod has recorded nothing yet: only the Job's absence
    # makes a deleted fingerprint fatal, and it is asked for only then.
    assert task_phase_from_job(JobOutcome.RUNNING, "", None)[0] == TaskPhase.PENDING
    assert pending_task_action(fingerprint_known=False) == PendingTaskAction.ASK_FOR_JOB
    assert pending_task_action(fingerprint_known=False, job_exists=True) == PendingTaskAction.LEAVE


def test_a_pending_task_without_a_job_fails_when_its_fingerprint_is_deleted():
    assert pending_task_action(fingerprint_known=False, job_exists=False) == PendingTaskAction.FAIL


def test_a_finished_task_stays_finished_whatever_event_comes_late():
    assert accept_task_phase("Running", TaskPhase.SUCCEEDED)
    assert accept_task_phase(None, TaskPhase.PENDING)
    assert not accept_task_phase("Succeeded", TaskPhase.RUNNING)
    assert not accept_task_phase("Succeeded", TaskPhase.FAILED)
    assert not accept_task_phase("Failed", TaskPhase.PENDING)


def test_progress_counts_the_latest_dispatch():
    tasks = [task(generation=1, phase=TaskPhase.FAILED), task(generation=2, phase=TaskPhase.SUCCEEDED),
             task(generation=2, phase=TaskPhase.RUNNING)]
    assert progress(tasks) == "1/2" and progress([]) == ""


def test_phases_are_typed_and_read_as_the_strings_stored_everywhere():
    assert SeriesPhase("Dispatched") is SeriesPhase.DISPATCHED and TaskPhase.SUCCEEDED == "Succeeded"
    assert f"{LatePolicy.REOPEN}" == "reopen" and new_series(KEY, CT, 1.0).received == frozenset()
