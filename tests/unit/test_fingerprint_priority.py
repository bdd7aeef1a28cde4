"""A Fingerprint's priority: it orders the work of `isdr run` (tests/unit/test_runner_loop.py) and,
on Kubernetes, spec.priorityClassName gives its Jobs' pods their PriorityClass. Validated by the
CRD's schema, the same in a local manifest and in the cluster."""

from __future__ import annotations

import yaml

from isdr_operator.jobs import build_job
from isdr_operator.settings import load_operator_settings
from relay.fingerprints.loader import load_fingerprint_file
from relay.fingerprints.manifest import fingerprint_to_manifest
from relay.lifecycle import TaskState, start_order
from tests.unit.test_operator_rules import KEY, fingerprint_body


def loaded(tmp_path, **spec):
    body = fingerprint_body()
    body.pop("status")
    body["metadata"] = {"name": "ct-organs"}
    body["spec"].update(spec)
    path = tmp_path / "fp.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_fingerprint_file(path)


def test_priority_defaults_to_zero_and_is_read_from_the_manifest(tmp_path):
    assert loaded(tmp_path).fingerprints[0].priority == 0
    (fp,) = loaded(tmp_path, priority=100).fingerprints
    assert fp.priority == 100 and fingerprint_to_manifest(fp)["spec"]["priority"] == 100


def test_a_priority_out_of_range_or_not_a_number_is_refused(tmp_path):
    for value, words in ((5000, "spec.priority: 5000 is greater than the maximum of 1000"), ("high", "not of type 'integer'")):
        result = loaded(tmp_path, priority=value)
        assert not result.fingerprints and words in str(result.problems[0]), result.problems


def test_higher_priority_first_then_the_longest_waiting():
    waiting = sorted([start_order(0, 1), start_order(100, 3), start_order(-5, 2), start_order(100, 4)])
    assert waiting == [start_order(100, 3), start_order(100, 4), start_order(0, 1), start_order(-5, 2)]


def test_the_fingerprints_priority_class_wins_over_the_charts_for_its_jobs():
    settings = load_operator_settings("ns", {"JOB_PRIORITY_CLASS_NAME": "isdr-batch"}).jobs
    task = TaskState(task_id="ct-organs-abc-1", fingerprint="ct-organs", generation=1)
    urgent = fingerprint_body()
    urgent["spec"]["priorityClassName"] = "isdr-urgent"

    def pod(body):
        return build_job(task=task, key=KEY, series_name="series-abc", fingerprint_body=body, settings=settings,
                         relay_get_timeout=60)["spec"]["template"]["spec"]

    assert pod(urgent)["priorityClassName"] == "isdr-urgent"
    assert pod(fingerprint_body())["priorityClassName"] == "isdr-batch"
