"""The series life-cycle rules: plain data in, the next step out."""

from dataclasses import replace

import pytest

from relay.fingerprints.model import (Destination, Fingerprint, InferenceServerRef, MatchRules,
                                      SeriesAttributes)
from relay.lifecycle import (DISPATCHED, FAILED, LATE_IGNORE, LATE_RERUN, RECEIVING, SUCCEEDED,
                             TASK_FAILED, TASK_RUNNING, TASK_SUCCEEDED, Cleanup, Dispatch,
                             DropUnmatched, Finish, Rules, Wait, apply_cleanup, apply_dispatch,
                             apply_finish, can_forget, next_step, on_instance, task_id, update_task)
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


def received(now=100.0, count=1):
    series, _ = on_instance(None, KEY, CT, "1.1", now, RULES)
    return replace(series, instance_count=count)


def test_first_instance_starts_a_receiving_series():
    series, note = on_instance(None, KEY, CT, "1.1", 100.0, RULES)
    assert (series.phase, series.instance_count, series.first_received, note) == (RECEIVING, 1, 100.0, None)


def test_more_instances_push_completion_back():
    series = received(now=100.0)
    series, _ = on_instance(series, KEY, CT, "1.2", 105.0, RULES)
    assert series.instance_count == 2
    assert next_step(series, [fingerprint("a")], 114.9, RULES, match_modality) == Wait(until=115.0)


def test_quiet_series_is_dispatched_to_every_matching_fingerprint_in_name_order():
    fps = [fingerprint("zeta"), fingerprint("alpha", "CT"), fingerprint("mr-only", "MR")]
    step = next_step(received(), fps, 110.0, RULES, match_modality)
    assert step == Dispatch(fingerprints=("alpha", "zeta"), generation=1)


def test_quiet_series_without_a_match_is_dropped():
    step = next_step(received(), [fingerprint("mr", "MR")], 110.0, RULES, match_modality)
    assert step == DropUnmatched()


def test_dispatch_creates_one_pending_task_per_fingerprint_with_deterministic_ids():
    series = apply_dispatch(received(), Dispatch(("a", "b"), 1), ["1.2", "1.1"], 111.0)
    assert series.phase == DISPATCHED
    assert series.dispatched_instances == ("1.1", "1.2")
    assert [t.task_id for t in series.tasks] == [task_id(KEY, "a", 1), task_id(KEY, "b", 1)]
    assert task_id(KEY, "a", 1) == task_id(KEY, "a", 1) != task_id(KEY, "a", 2)


def test_task_id_is_a_dns_label_even_for_odd_fingerprint_names():
    ident = task_id(KEY, "CT_Organs At Risk (v2)!" * 5, 3)
    assert len(ident) <= 63 and ident.replace("-", "").isalnum() and ident == ident.lower()


def dispatched(*names):
    return apply_dispatch(received(), Dispatch(tuple(names), 1), ["1.1"], 111.0)


def test_dispatched_series_waits_for_its_tasks():
    series = dispatched("a", "b")
    series = update_task(series, replace(series.tasks[0], phase=TASK_SUCCEEDED))
    assert next_step(series, [], 500.0, RULES, match_modality) == Wait()


@pytest.mark.parametrize("phases, expected", [
    ((TASK_SUCCEEDED, TASK_SUCCEEDED), SUCCEEDED),
    ((TASK_SUCCEEDED, TASK_FAILED), FAILED),
])
def test_series_finishes_when_every_task_has(phases, expected):
    series = dispatched("a", "b")
    for task, phase in zip(series.tasks, phases):
        series = update_task(series, replace(task, phase=phase))
    assert next_step(series, [], 500.0, RULES, match_modality) == Finish(phase=expected)


def test_cleanup_deletes_instances_only_when_delete_on_post_and_succeeded():
    series = apply_finish(dispatched("a"), Finish(SUCCEEDED), 200.0)
    assert next_step(series, [], 201.0, RULES, match_modality) == Cleanup(delete_instances=True)
    keep = Rules(post_after=10, delete_on_post=False)
    assert next_step(series, [], 201.0, keep, match_modality) == Cleanup(delete_instances=False)
    failed = apply_finish(dispatched("a"), Finish(FAILED), 200.0)
    # A failed series keeps its instances, so that nothing acknowledged is lost to a model error.
    assert next_step(failed, [], 201.0, RULES, match_modality) == Cleanup(delete_instances=False)


def test_a_cleaned_series_is_forgotten_only_after_the_late_instance_window():
    series = dispatched("a")
    series = update_task(series, replace(series.tasks[0], phase=TASK_SUCCEEDED))
    series = apply_cleanup(apply_finish(series, Finish(SUCCEEDED), 200.0))
    assert not can_forget(series, 200.0 + RULES.forget_after - 1, RULES)
    assert can_forget(series, 200.0 + RULES.forget_after, RULES)
    assert not can_forget(series, 10**9, Rules(delete_on_post=False))


def test_late_instance_with_ignore_policy_is_kept_and_counted_but_not_rerun():
    series = apply_cleanup(apply_finish(dispatched("a"), Finish(SUCCEEDED), 200.0))
    late, note = on_instance(series, KEY, CT, "1.9", 300.0, Rules(late_instance_policy=LATE_IGNORE))
    assert late.phase == SUCCEEDED and late.late_instances == 1
    assert "ignore" in note
    # The late instance is cleaned up like the rest of the series, without a new dispatch.
    assert next_step(late, [fingerprint("a")], 1000.0, RULES, match_modality) == Cleanup(True)


def test_late_instance_with_rerun_policy_reopens_and_dispatches_a_new_generation():
    rerun = Rules(post_after=10, late_instance_policy=LATE_RERUN)
    series = dispatched("a")
    series = update_task(series, replace(series.tasks[0], phase=TASK_RUNNING))
    reopened, note = on_instance(series, KEY, CT, "1.9", 300.0, rerun)
    assert reopened.phase == RECEIVING and "re-opened" in note
    assert next_step(reopened, [fingerprint("a")], 305.0, rerun, match_modality) == Wait(until=310.0)
    step = next_step(reopened, [fingerprint("a")], 310.0, rerun, match_modality)
    assert step == Dispatch(fingerprints=("a",), generation=2)
    again = apply_dispatch(reopened, step, ["1.1", "1.9"], 310.0)
    assert [t.generation for t in again.tasks] == [1, 2]
    assert len({t.task_id for t in again.tasks}) == 2


def test_a_rerun_that_succeeds_supersedes_an_earlier_failure_of_the_same_fingerprint():
    rerun = Rules(late_instance_policy=LATE_RERUN)
    series = dispatched("a")
    series = update_task(series, replace(series.tasks[0], phase=TASK_FAILED))
    reopened, _ = on_instance(series, KEY, CT, "1.9", 300.0, rerun)
    again = apply_dispatch(reopened, Dispatch(("a",), 2), ["1.1", "1.9"], 310.0)
    again = update_task(again, replace(again.tasks[1], phase=TASK_SUCCEEDED))
    assert next_step(again, [], 400.0, rerun, match_modality) == Finish(SUCCEEDED)
