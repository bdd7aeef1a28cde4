"""The operator at scale, as rules: what it does (and does not do) with the series it finds when it
starts. The operator's own Runtime runs in the test against the real control plane, through the
real KubeApi; the test only counts the calls it makes (the timings are the benchmark's business:
scripts/bench_operator.py)."""

from __future__ import annotations

import time

import pytest

from isdr_operator.jobs import build_job
from isdr_operator.runtime import Runtime
from isdr_operator.scheduler import Work
from isdr_operator.settings import load_operator_settings
from relay.kube.api import KubeApi
from relay.kube.resources import GROUP, VERSION, resource_name, to_rfc3339
from relay.lifecycle import TaskState, task_id
from relay.uids import SeriesKey
from tests.support.dicomseries import CT_IMAGE, create_series, finished_series
from tests.support.processes import wait_until

pytestmark = pytest.mark.kube

FINISHED = 20


class CountingApi(KubeApi):
    """The operator's KubeApi, noting every call it makes: (client method, custom resource plural)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str | None]] = []

    def _call(self, method, *args, **kwargs):
        self.calls.append((method.__name__, args[3] if "custom_object" in method.__name__ else None))
        return super()._call(method, *args, **kwargs)

    def writes(self) -> list[tuple[str, str | None]]:
        return [call for call in self.calls if not call[0].startswith(("get_", "list_", "read_"))]


def dispatched_series(now: float) -> tuple[dict, dict, TaskState]:
    """A series dispatched before the restart: one Pending task, whose Job exists already."""
    key = SeriesKey("1.2.826.0.1.3680043.10.2.1", CT_IMAGE)
    body, _ = finished_series(0, now, fingerprint="ct")
    body["metadata"]["name"] = resource_name(key)
    body["spec"].update(seriesInstanceUID=key.series_uid, storage={"type": "local", "prefix": key.prefix})
    task = TaskState(task_id=task_id(key, "ct", 1), fingerprint="ct", generation=1)
    status = {"instances": 3, "firstReceived": to_rfc3339(now - 30), "lastReceived": to_rfc3339(now - 20),
              "phase": "Dispatched", "generation": 1, "dispatchedInstances": 3,
              "dispatchedTime": to_rfc3339(now - 10), "progress": "0/1",
              "tasks": [{"taskId": task.task_id, "fingerprint": "ct", "generation": 1, "job": task.task_id,
                         "phase": "Pending", "startTime": to_rfc3339(now - 10)}]}
    return body, status, task


@pytest.fixture
def restarted(kube_cluster, kube_namespace, tmp_path):
    """(runtime, api, dispatched series' name): FINISHED finished series, one dispatched series
    with its Job, and an operator Runtime that has just caught up with them (its resync)."""
    custom = kube_cluster.custom
    fingerprint = custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, "fingerprints", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Fingerprint", "metadata": {"name": "ct"},
        "spec": {"match": {"modality": "^CT$"}, "inferenceServer": {"url": "http://127.0.0.1:9", "model": "m"},
                 "destinations": [{"host": "127.0.0.1", "port": 104, "aeTitle": "PACS"}]}})
    now = time.time()
    for index in range(1, FINISHED + 1):
        create_series(custom, kube_namespace, *finished_series(index, now, fingerprint="ct"))
    body, status, task = dispatched_series(now)
    series = create_series(custom, kube_namespace, body, status)
    settings = load_operator_settings(kube_namespace, {"INCOMING_DIR": str(tmp_path / "data"),
                                                       "SERIES_RETENTION": "86400", "POST_AFTER": "1"})
    kube_cluster.batch.create_namespaced_job(kube_namespace, build_job(
        task=task, key=SeriesKey(body["spec"]["seriesInstanceUID"], CT_IMAGE),
        series_name=series["metadata"]["name"], fingerprint_body=fingerprint, settings=settings.jobs,
        relay_get_timeout=settings.relay.get_timeout))

    api = CountingApi(kube_cluster.api_client, kube_namespace)
    runtime = Runtime(api, settings)
    runtime.resync()
    yield runtime, api, series["metadata"]["name"]
    runtime.stop()


def test_finished_series_found_at_start_up_cost_no_call_beyond_the_listing(restarted):
    runtime, api, dispatched = restarted
    # Only the dispatched series waits for a look, in the background; the finished ones wait for
    # SERIES_RETENTION (a day here), when they are to be forgotten.
    assert runtime.scheduler.pending() == {"receiving": 0, "fresh": 0, "background": 1, "later": FINISHED}
    # kopf's own listing when its watch starts brings every object once more: still nothing.
    for body in api.series_listing():
        runtime.series_event(None, body)
    assert runtime.scheduler.pending() == {"receiving": 0, "fresh": 0, "background": 1, "later": FINISHED}
    assert not [call for call in api.calls if call[1] == "dicomseries" and not call[0].startswith("list_")]
    # The one write: the new Fingerprint's Ready condition.
    assert api.writes() == [("patch_namespaced_custom_object_status", "fingerprints")]


def test_a_job_seen_already_is_not_created_again(restarted):
    runtime, api, dispatched = restarted
    name, work = runtime.scheduler._next()
    assert (name, work) == (dispatched, Work.BACKGROUND)
    api.calls.clear()
    runtime.driver.step(name)
    runtime.driver.step(name)
    assert api.writes() == []
    assert api.calls == [("get_namespaced_custom_object", "dicomseries")] * 2


def test_a_finished_series_looked_at_anyway_is_read_and_not_written(restarted, kube_namespace):
    runtime, api, _ = restarted
    finished, _ = finished_series(1, time.time())
    api.calls.clear()
    assert runtime.driver.step(finished["metadata"]["name"]) > 3600  # its next look: SERIES_RETENTION
    assert api.calls == [("get_namespaced_custom_object", "dicomseries")]


def test_a_series_that_changes_is_looked_at_before_the_start_up_backlog(restarted):
    runtime, api, dispatched = restarted
    changed = next(body for body in api.series_listing() if body["metadata"]["name"] != dispatched)
    changed["status"]["lastReceived"] = to_rfc3339(time.time())  # a late instance, as the receiver says
    runtime.series_event("MODIFIED", changed)
    assert runtime.scheduler.pending() == {"receiving": 0, "fresh": 1, "background": 1, "later": FINISHED - 1}
    assert runtime.scheduler._next() == (changed["metadata"]["name"], Work.FRESH)


def test_a_step_starts_from_the_watched_version_and_only_series_due_soon_are_held(restarted):
    runtime, api, dispatched = restarted
    for body in api.series_listing():
        runtime.series_event("MODIFIED", body)  # as the watch would bring each of them
    # The finished series wait for SERIES_RETENTION (a day): not held. The dispatched one, with
    # its task under way, is looked at within TASK_CHECK_INTERVAL: held, and its step reads nothing.
    assert len(runtime.driver.latest) == 1 and runtime.driver.latest.get(dispatched)
    api.calls.clear()
    runtime.driver.step(dispatched)
    assert api.calls == []


def test_the_series_watch_lists_once_then_hands_over_every_change_and_deletion(kube_cluster, kube_namespace):
    from isdr_operator.watching import Watch

    custom = kube_cluster.custom
    now = time.time()
    first, _ = finished_series(1, now)
    create_series(custom, kube_namespace, *finished_series(1, now))
    api = CountingApi(kube_cluster.api_client, kube_namespace)
    events: list[tuple[str | None, str]] = []
    watch = Watch("DicomSeries", api.series_listing, api.watch_series,
                  lambda kind, body: events.append((kind, body["metadata"]["name"])))
    watch.start()
    try:
        assert watch.listed.wait(30)
        second, status = finished_series(2, now)
        create_series(custom, kube_namespace, second, status)
        custom.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, "dicomseries",
                                               first["metadata"]["name"])
        wait_until(lambda: ("DELETED", first["metadata"]["name"]) in events, 30, "the deletion's event")
    finally:
        watch.stop()
    name = second["metadata"]["name"]
    assert events == [(None, first["metadata"]["name"]), ("ADDED", name), ("MODIFIED", name),
                      ("DELETED", first["metadata"]["name"])]
    assert api.calls == [("list_namespaced_custom_object", "dicomseries")]  # one page; the watch is one request


def test_a_watch_whose_version_expired_lists_again(kube_cluster, kube_namespace, caplog):
    """Version 1 is older than anything the API server keeps for DicomSeries (their CRD was
    installed long after): it answers 410 Gone, and the watch starts over with a listing."""
    from isdr_operator.watching import Watch

    body, status = finished_series(1, time.time())
    create_series(kube_cluster.custom, kube_namespace, body, status)
    api = CountingApi(kube_cluster.api_client, kube_namespace)
    events: list[tuple[str | None, str]] = []
    watch = Watch("DicomSeries", api.series_listing, api.watch_series,
                  lambda kind, body: events.append((kind, body["metadata"]["name"])))
    with caplog.at_level("INFO", logger="isdr_operator.watching"):
        watch.start(since="1")
        try:
            wait_until(lambda: events, 30, "the listing after the expired version")
        finally:
            watch.stop()
    assert events == [(None, body["metadata"]["name"])]
    assert "the watch's version expired; listing them again" in caplog.text


def test_no_series_is_looked_at_before_the_operator_has_read_the_fingerprints(kube_cluster, kube_namespace, tmp_path):
    # The peering gate opens before the resync reads the Fingerprints, and the series watch brings
    # a complete series from the start: looked at then, it would be taken for unmatched and deleted.
    custom = kube_cluster.custom
    custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, "fingerprints", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Fingerprint", "metadata": {"name": "ct"},
        "spec": {"match": {"modality": "^CT$"}, "inferenceServer": {"url": "http://127.0.0.1:9", "model": "m"},
                 "destinations": [{"host": "127.0.0.1", "port": 104, "aeTitle": "PACS"}]}})
    now = time.time()
    body, _, _ = dispatched_series(now)
    quiet = {"instances": 3, "firstReceived": to_rfc3339(now - 30), "lastReceived": to_rfc3339(now - 20),
             "phase": "Receiving"}
    name = create_series(custom, kube_namespace, body, quiet)["metadata"]["name"]
    settings = load_operator_settings(kube_namespace, {"INCOMING_DIR": str(tmp_path / "data"),
                                                       "SERIES_RETENTION": "86400", "POST_AFTER": "1"})
    api = CountingApi(kube_cluster.api_client, kube_namespace)
    runtime = Runtime(api, settings)
    key = SeriesKey(body["spec"]["seriesInstanceUID"], CT_IMAGE)
    for number in range(1, 4):  # what the receiver stored
        runtime.storage.put(key.instance_key(f"1.2.826.0.1.3680043.10.2.1.{number}"), [b"DICM"])
    try:
        assert runtime.driver.triage(custom.get_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, "dicomseries", name)) == 0.0  # due now, as far as the watch knows

        assert runtime._step(name) > 0  # not yet: look again soon
        assert api.calls == []

        runtime.resync()
        api.calls.clear()
        # Matched and dispatched (once quiet for POST_AFTER since the instances were stored), not dropped.
        wait_until(lambda: runtime._step(name) is None or ("create_namespaced_job", None) in api.writes(), 15,
                   "the series dispatched")
        assert ("create_namespaced_job", None) in api.writes()
    finally:
        runtime.stop()
