"""The operator's own observability: kopf's success lines quiet, series phases from watch events."""

from __future__ import annotations

import logging

import pytest

from isdr_operator.observability import KOPF_HANDLER_LOGGERS, SeriesPhases, quiet_kopf_successes


@pytest.fixture
def kopf_log(caplog):
    quiet_kopf_successes()
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.mark.parametrize("logger", KOPF_HANDLER_LOGGERS)
def test_kopf_handler_and_activity_successes_are_not_logged(kopf_log, logger):
    logging.getLogger(logger).info("Handler 'series_event' succeeded.")
    logging.getLogger(logger).info("Activity 'scheduler' succeeded.")
    assert "succeeded" not in kopf_log.text


@pytest.mark.parametrize("logger", KOPF_HANDLER_LOGGERS)
def test_kopf_warnings_errors_and_other_lines_still_are(kopf_log, logger):
    log = logging.getLogger(logger)
    log.error("Handler 'series_event' failed temporarily: the API is down")
    log.warning("Handler 'job_event' succeeded.")  # at WARNING, whatever it says
    log.info("Handler 'series_event' is retried.")
    assert [r.getMessage() for r in kopf_log.records] == [
        "Handler 'series_event' failed temporarily: the API is down",
        "Handler 'job_event' succeeded.",
        "Handler 'series_event' is retried.",
    ]


def test_quieting_twice_adds_one_filter():
    quiet_kopf_successes()
    quiet_kopf_successes()
    assert len(logging.getLogger("kopf.objects").filters) == 1


def series_body(phase=None, tasks=()):
    status = {"tasks": [{"taskId": f"t{n}", "phase": p} for n, p in enumerate(tasks)]}
    if phase:
        status["phase"] = phase
    return {"metadata": {"name": "x"}, "status": status}


def test_series_phases_follow_the_watch_events():
    phases = SeriesPhases()
    phases.observe(None, "a", series_body())  # seen at start-up, just created: Receiving
    phases.observe("ADDED", "b", series_body("Dispatched", ("Running", "Pending")))
    phases.observe("MODIFIED", "b", series_body("Succeeded", ("Succeeded", "Succeeded")))
    phases.observe("ADDED", "c", {"metadata": {"name": "c"}})
    phases.observe("DELETED", "c", {})

    assert sorted(phases.snapshot()) == [("Receiving", ()), ("Succeeded", ("Succeeded", "Succeeded"))]


def test_only_the_active_operator_reports_series_and_says_whether_it_is_active():
    from isdr_operator.observability import ActiveCollector, while_active
    from relay import metrics

    phases = SeriesPhases()
    phases.observe("ADDED", "a", series_body("Dispatched", ("Running",)))
    state = {"active": False}
    series = metrics.SeriesCollector(while_active(phases.snapshot, lambda: state["active"]))
    active = ActiveCollector(lambda: state["active"])

    def samples():
        return {(s.name, s.labels.get("phase")): s.value
                for c in (series, active) for f in c.collect() for s in f.samples}

    standby = samples()
    assert standby[("isdr_operator_active", None)] == 0 and standby[("isdr_series", "Dispatched")] == 0
    state["active"] = True
    now_active = samples()
    assert now_active[("isdr_operator_active", None)] == 1 and now_active[("isdr_series", "Dispatched")] == 1
