"""The isdr.io/retry and isdr.io/cancel annotations: a new value is a new request, answered once in
status.requests (relay.kube.resources)."""

from relay.kube.resources import ANNOTATION_CANCEL, ANNOTATION_RETRY, pending_request, request_status
from relay.lifecycle import AdminAction


def series(annotations=None, requests=None):
    body = {"metadata": {"name": "series-0123456789", "annotations": annotations or {}}, "status": {}}
    if requests:
        body["status"]["requests"] = requests
    return body


def answered(body, action, value):
    body["status"].update(request_status(action, value, True, "done", 10.0))
    return body


def test_no_annotation_no_request():
    assert pending_request(series()) is None


def test_a_new_value_is_a_request_and_an_answered_one_is_not():
    body = series({ANNOTATION_RETRY: "1"})
    assert pending_request(body) == (AdminAction.RETRY, "1")

    answered(body, AdminAction.RETRY, "1")
    assert pending_request(body) is None

    body["metadata"]["annotations"][ANNOTATION_RETRY] = "2"
    assert pending_request(body) == (AdminAction.RETRY, "2")


def test_each_action_is_answered_on_its_own():
    body = answered(series({ANNOTATION_RETRY: "a", ANNOTATION_CANCEL: "a"}), AdminAction.RETRY, "a")

    assert pending_request(body) == (AdminAction.CANCEL, "a")


def test_a_value_too_long_for_the_answer_is_answered_under_its_digest():
    body = series({ANNOTATION_CANCEL: "x" * 1000})
    action, value = pending_request(body)

    assert value.startswith("sha256:") and len(value) < 256
    assert pending_request(answered(body, action, value)) is None


def test_the_answer_says_what_was_done_and_when():
    assert request_status(AdminAction.CANCEL, "7", False, "the series has no running task", 0.0) == {
        "requests": {"cancel": {"value": "7", "accepted": False, "message": "the series has no running task",
                                "time": "1970-01-01T00:00:00.000000Z"}}}
