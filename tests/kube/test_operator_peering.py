"""One active operator: with two replicas (a scaled Deployment, a rolling update), neither acts
while both run, and the one left carries on alone. Real control plane, real `isdr operator`
processes with kopf's peering, dcmtk's storescu and storescp, the InferenceServer emulator.
"""

from __future__ import annotations

import sys
import time

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.kube.relay_harness import REPO_ROOT, fingerprint_manifest, key_of
from tests.support.processes import ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.kube


def second_operator(r, name: str) -> ManagedProcess:
    """Another `isdr operator` on the same peering, as a second replica of the chart's Deployment."""
    env = {**r.env, "POD_ID": name}
    return ManagedProcess(
        [sys.executable, "-m", "relay.cli", "operator", "--namespace", r.namespace, "--peering", "isdr",
         "--liveness", f"http://127.0.0.1:{free_port()}/healthz"],
        r.workdir / f"{name}.log", env=env, cwd=REPO_ROOT)


def test_two_replicas_never_act_at_once_and_the_one_left_carries_on(kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    r = relay(POD_ID="operator-a")
    assert r.apply(fingerprint_manifest("ct", emulator, pacs)).returncode == 0
    wait_until(lambda: r.fingerprint("ct").get("status"), 30, "the fingerprint to be seen")

    b = second_operator(r, "operator-b")
    try:
        wait_until(lambda: "paused: another operator with the same priority" in r.operator_log(), 60,
                   "operator-a to pause for operator-b")
        wait_until(lambda: "paused" in b.output() or "not (or no longer)" in b.output(), 60,
                   "operator-b to stay paused")
        files = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)
        key = key_of(files)
        r.send(files)
        wait_until(lambda: r.series(key), 30, "the receiver's DicomSeries")
        # POST_AFTER is 1 s: the series is due now. Give a running operator ample time to act.
        time.sleep(8)
        assert r.jobs(key) == [], "a paused operator created a Job"
        assert (r.series(key)["status"].get("phase") or "Receiving") == "Receiving"
        assert "created Job" not in r.operator_log() + b.output()
        status, health = r.health()
        assert status == 200 and health["scheduler"]["active"] is False
    finally:
        b.stop(timeout=30)  # a clean exit: kopf takes operator-b out of the peering

    wait_until(lambda: "operator-a active" in r.operator_log(), 60, "operator-a to resume")
    job = wait_until(lambda: (jobs := r.jobs(key)) and jobs[0], 60, "the Job, from operator-a")
    kube_cluster.wait_job_condition(r.namespace, job.metadata.name, "Complete", timeout=120)
    pacs.wait_for_files(1)
    assert len(r.jobs(key)) == 1 and emulator.stats()["submits"] == 1
    assert "resumed" in r.operator_log()
