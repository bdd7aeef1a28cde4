"""An administrator's requests, as life-cycle rules: what `isdr series retry|rematch|cancel` and the
isdr.io/retry, isdr.io/rematch and isdr.io/cancel annotations do to a series, in both modes; and
unmatched series kept for UNMATCHED_RETENTION."""

from dataclasses import replace

from relay.lifecycle import (CANCELLED, CancelTasks, Dispatch, DropUnmatched, KeepUnmatched, ListStorage, Refused,
                             Reopen, SeriesPhase, TaskPhase, Wait, apply_cancel, apply_dispatch, apply_finish,
                             apply_keep_unmatched, cancel_decision, next_step, on_instance, rematch_decision,
                             retry_decision, update_task)
from tests.unit.test_lifecycle import (CT, KEY, RULES, dispatched, finish_tasks, fingerprint, match_modality, received,
                                       step)


def ended(*outcomes, uids=("1.1", "1.2")):
    """A finished series whose tasks a, b, ... ended as `outcomes` say."""
    names = [chr(ord("a") + i) for i in range(len(outcomes))]
    series = dispatched(*names, uids=uids)
    for task, outcome in zip(series.tasks, outcomes):
        series = update_task(series, replace(task, phase=outcome))
    return apply_finish(series, step(series, 200.0), 200.0)


FAILED, SUCCEEDED = TaskPhase.FAILED, TaskPhase.SUCCEEDED


def test_retry_dispatches_again_only_the_failed_fingerprints_with_every_stored_instance():
    series = ended(FAILED, SUCCEEDED)

    decision = retry_decision(series, None, ["a", "b"])

    assert decision == Dispatch(fingerprints=("a",), generation=2, instances=("1.1", "1.2"))


def test_a_retry_that_succeeds_makes_the_series_succeed():
    series = ended(FAILED, SUCCEEDED)
    retried = apply_dispatch(series, retry_decision(series, None, ["a", "b"]), 300.0)
    assert retried.phase == SeriesPhase.DISPATCHED and len(retried.active_tasks) == 1

    done = finish_tasks(retried)

    assert next_step(done, [], 301.0, RULES, match_modality).phase == SeriesPhase.SUCCEEDED


def test_retry_needs_the_facts_when_the_stored_instances_are_not_known():
    series = replace(ended(FAILED), received=None)

    assert retry_decision(series, None, ["a"]) == ListStorage()


def test_retry_is_refused_when_instances_the_failed_task_sent_are_gone():
    series = replace(ended(FAILED), received=frozenset({"1.1"}))

    decision = retry_decision(series, None, ["a"])

    assert isinstance(decision, Refused) and decision.reason.startswith("1 of the 2 instance(s)")


def test_retry_is_refused_when_nothing_failed():
    assert retry_decision(ended(SUCCEEDED), None, ["a"]) == Refused(
        "no failed task to retry (a succeeded task delivered its predictions already)")


def test_retry_is_refused_while_the_series_receives_or_runs():
    assert "receiving" in retry_decision(received("1.1"), None, ["a"]).reason
    assert "running 1 task(s)" in retry_decision(dispatched("a"), None, ["a"]).reason


def test_retry_is_refused_when_the_fingerprint_is_gone():
    assert retry_decision(ended(FAILED), None, ["other"]).reason.startswith("fingerprint(s) a no longer exist")


def test_retry_of_one_task_retries_that_task_only_and_only_once():
    series = ended(FAILED, FAILED)
    b = series.tasks[1]

    decision = retry_decision(series, b.task_id, ["a", "b"])
    assert decision.fingerprints == ("b",)
    retried = finish_tasks(apply_dispatch(series, decision, 300.0), FAILED)
    retried = apply_finish(retried, step(retried, 301.0), 301.0)

    again = retry_decision(retried, b.task_id, ["a", "b"])
    assert isinstance(again, Refused) and "retried already" in again.reason
    assert retry_decision(retried, "nope", ["a", "b"]) == Refused("the series has no task nope")


def test_cancel_stops_every_running_task_or_the_one_named():
    series = dispatched("a", "b")
    a, b = series.tasks

    assert cancel_decision(series, None) == CancelTasks((a.task_id, b.task_id))
    assert cancel_decision(series, b.task_id) == CancelTasks((b.task_id,))


def test_cancel_is_refused_for_finished_tasks():
    series = ended(SUCCEEDED)

    assert cancel_decision(series, None) == Refused("the series has no running task")
    assert "already finished (Succeeded)" in cancel_decision(series, series.tasks[0].task_id).reason


def test_a_cancelled_task_failed_and_says_why_and_what_became_of_its_remote_task():
    task = replace(dispatched("a").tasks[0], phase=TaskPhase.RUNNING, remote_delete_pending=True)

    cancelled = apply_cancel(task, 5.0, "remote task X deleted")

    assert cancelled.phase == FAILED and not cancelled.remote_delete_pending
    assert cancelled.message == f"{CANCELLED}; remote task X deleted"


# --- unmatched series kept (UNMATCHED_RETENTION), and matched again --------------------------------

KEEPING = replace(RULES, unmatched_retention=600.0)


def unmatched(now=111.0):
    series = received("1.1", "1.2")
    decision = next_step(series, [fingerprint("mr", modality="MR")], now, KEEPING, match_modality)
    assert decision == KeepUnmatched(until=now + 600.0)
    return apply_keep_unmatched(series, decision, now)


def test_by_default_an_unmatched_series_is_dropped_at_once():
    assert isinstance(step(received("1.1"), 111.0, fingerprints=[fingerprint("mr", "MR")]), DropUnmatched)


def test_a_kept_unmatched_series_waits_then_is_dropped_with_its_instances():
    series = unmatched()

    assert series.phase == SeriesPhase.UNMATCHED
    assert next_step(series, [], 500.0, KEEPING, match_modality) == Wait(until=711.0)
    assert next_step(series, [], 711.0, KEEPING, match_modality) == DropUnmatched(instances=("1.1", "1.2"))


def test_a_shortened_retention_drops_a_kept_series_sooner():
    shorter = replace(KEEPING, unmatched_retention=10.0)

    assert isinstance(next_step(unmatched(), [], 121.0, shorter, match_modality), DropUnmatched)


def test_a_new_instance_reopens_a_kept_unmatched_series():
    series = on_instance(unmatched(), KEY, CT, "1.3", 200.0)

    assert isinstance(next_step(series, [], 200.0, KEEPING, match_modality), Reopen)


def test_rematch_dispatches_a_kept_series_to_the_fingerprints_it_matches_now():
    series = unmatched()

    decision = rematch_decision(series, [fingerprint("ct", modality="CT"), fingerprint("mr", modality="MR")],
                                match_modality)

    assert decision == Dispatch(fingerprints=("ct",), generation=1, instances=("1.1", "1.2"))
    assert apply_dispatch(series, decision, 300.0).phase == SeriesPhase.DISPATCHED


def test_rematch_is_refused_when_nothing_matches_or_the_series_is_not_kept_unmatched():
    assert "still matches no fingerprint" in rematch_decision(unmatched(), [fingerprint("mr", "MR")],
                                                              match_modality).reason
    assert "not Unmatched" in rematch_decision(ended(FAILED), [fingerprint("a")], match_modality).reason
    assert rematch_decision(replace(unmatched(), received=None), [], match_modality) == ListStorage()
