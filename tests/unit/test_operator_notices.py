"""What the operator says on the side (isdr_operator.notices) and the versions it keeps for its
steps (isdr_operator.latest): Events in order, a Fingerprint's counters summed into one patch,
and a kept version never replaced by an older one."""

from __future__ import annotations

import threading

from isdr_operator.latest import LatestSeries
from isdr_operator.notices import Notices
from relay.kube.api import Conflict


class RecordingApi:
    """The calls Notices makes, with a Fingerprint whose status the patches change; `conflicts`
    patches are refused first (another writer changed the Fingerprint)."""

    def __init__(self, conflicts: int = 0, hold: threading.Event | None = None):
        self.fingerprints = {"ct": {"metadata": {"name": "ct", "resourceVersion": "1"}, "status": {"matchedSeries": 4}}}
        self.calls: list[tuple] = []
        self.conflicts = conflicts
        self.hold = hold

    def event(self, body, reason, message, warning=False, now=None):
        if self.hold is not None:
            self.hold.wait(5)
        self.calls.append(("event", body["metadata"]["name"], reason, now))

    def get_fingerprint(self, name):
        self.calls.append(("get", name))
        return self.fingerprints.get(name)

    def patch_fingerprint_status(self, name, status, resource_version=None):
        self.calls.append(("patch", name, status))
        if self.conflicts:
            self.conflicts -= 1
            raise Conflict("changed meanwhile")
        self.fingerprints[name]["status"].update(status)


def series(name: str, version: str) -> dict:
    return {"apiVersion": "isdr.io/v1alpha1", "kind": "DicomSeries",
            "metadata": {"name": name, "resourceVersion": version, "uid": "u-" + name}}


def test_events_are_posted_in_the_order_said_and_stamped_when_said():
    api = RecordingApi()
    clock = iter(range(100, 200)).__next__
    notices = Notices(api, clock=clock)
    notices.event(series("a", "7"), "Dispatched", "one")
    notices.event(series("b", "8"), "Succeeded", "two")
    assert notices.flush(5)
    assert api.calls == [("event", "a", "Dispatched", 100), ("event", "b", "Succeeded", 101)]
    notices.stop()


def test_counts_that_come_together_are_one_read_and_one_patch_then_their_events():
    hold = threading.Event()
    api = RecordingApi(hold=hold)
    notices = Notices(api)
    notices.event(series("first", "1"), "Dispatched", "holds the thread while the others queue")
    for index in range(3):
        notices.count("ct", "matchedSeries", ("Matched", f"series {index}", False))
    notices.count("ct", "succeededTasks")
    hold.set()
    assert notices.flush(5)
    patches = [call for call in api.calls if call[0] == "patch"]
    assert len(patches) == 1 and patches[0][2]["matchedSeries"] == 7 and patches[0][2]["succeededTasks"] == 1
    assert [call[2] for call in api.calls if call[0] == "event"] == ["Dispatched", "Matched", "Matched", "Matched"]
    notices.stop()


def test_a_conflicting_count_is_read_and_sent_again_and_a_deleted_fingerprint_says_nothing():
    api = RecordingApi(conflicts=1)
    notices = Notices(api)
    notices.count("ct", "failedTasks", ("TaskFailed", "Job j failed", True))
    notices.count("gone", "matchedSeries", ("Matched", "series s", False))
    assert notices.flush(5)
    assert api.fingerprints["ct"]["status"]["failedTasks"] == 1
    assert [call[0] for call in api.calls] == ["get", "patch", "get", "patch", "event", "get"]
    notices.stop()


def test_a_full_queue_drops_notices_instead_of_holding_up_the_steps():
    hold = threading.Event()
    api = RecordingApi(hold=hold)
    notices = Notices(api, limit=2)
    for index in range(10):
        notices.event(series(f"s{index}", "1"), "Dispatched", "")
    hold.set()
    assert notices.flush(5)
    assert 2 <= len(api.calls) <= 3  # one taken by the thread at once, two queued, the rest dropped
    notices.stop()


def test_a_kept_version_is_replaced_by_newer_ones_only():
    latest = LatestSeries()
    latest.put(series("a", "10"))
    latest.put(series("a", "9"))  # the watch, late, after the operator's own write
    assert latest.get("a")["metadata"]["resourceVersion"] == "10"
    latest.put(series("a", "11"))
    assert latest.get("a")["metadata"]["resourceVersion"] == "11"


def test_only_series_waiting_for_a_step_are_kept():
    latest = LatestSeries()
    latest.refresh(series("written", "3"))  # the operator's write of a series nobody waits for
    assert latest.get("written") is None and len(latest) == 0
    latest.put(series("a", "1"))
    latest.refresh(series("a", "2"))
    assert latest.get("a")["metadata"]["resourceVersion"] == "2"
    latest.drop("a")
    assert latest.get("a") is None
