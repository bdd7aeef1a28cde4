"""Replicas converge: two `isdr scp` replicas that each receive part of one series (interleaved,
or one half each, at the same time) make one DicomSeries with the right count, and the operator
runs one Job with every instance. Real control plane, real `isdr scp` and `isdr operator`
processes, dcmtk's storescu, the Job's pod through the node agent, the InferenceServer emulator.
"""

from __future__ import annotations

import sys
import threading

import pytest

from isdr_devtools.synthetic import write_ct_series
from relay.kube.resources import resource_name
from tests.kube.relay_harness import REPO_ROOT, fingerprint_manifest, key_of
from tests.support.dicom_peers import storescu
from tests.support.processes import ManagedProcess, free_port, wait_for_port, wait_until

pytestmark = pytest.mark.kube


def test_two_receivers_splitting_series_make_one_object_and_one_job_with_every_instance(
        kube_cluster, relay, peers, tmp_path):
    emulator, pacs = peers
    # Quiet for 3 s: the two halves of a series arrive together, so it is complete only after both.
    r = relay(POST_AFTER=3)
    assert r.apply(fingerprint_manifest("ct", emulator, pacs)).returncode == 0
    wait_until(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                           for c in (r.fingerprint("ct").get("status") or {}).get("conditions", [])),
               30, "the Fingerprint to be Ready")
    port_b = free_port()
    b = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", r.namespace],
                       r.workdir / "scp-b.log", env={**r.env, "SCP_PORT": str(port_b), "POD_NAME": "receiver-b"},
                       cwd=REPO_ROOT)
    try:
        wait_for_port(port_b, process=b.popen, timeout=60)
        interleaved = write_ct_series(tmp_path / "seven", count=7, rows=16, cols=16)
        halves = write_ct_series(tmp_path / "halves", count=41, rows=16, cols=16)
        parts = [(r.scp_port, interleaved[::2]), (port_b, interleaved[1::2]),
                 (r.scp_port, halves[:20]), (port_b, halves[20:])]
        results = []
        senders = [threading.Thread(target=lambda port, files: results.append(storescu(port, files, called_ae="ISDR")),
                                    args=part) for part in parts]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert [result.returncode for result in results] == [0] * 4, [result.stdout for result in results]

        for files in (interleaved, halves):
            key = key_of(files)
            series = r.wait_series_phase(key, "Succeeded", timeout=180)
            assert series["metadata"]["name"] == resource_name(key)
            assert series["status"]["instances"] == len(files)
            assert series["status"]["dispatchedInstances"] == len(files)
            assert len(series["status"]["receivedBy"]) == 2
            (job,) = r.jobs(key)
            pod = kube_cluster.job_pods(r.namespace, job.metadata.name)[0]["metadata"]["name"]
            assert f"submitted {len(files)} instances" in kube_cluster.pod_log(r.namespace, pod)
        assert emulator.stats()["submits"] == 2
        for log in (r.scp_log(), b.output()):
            assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    finally:
        b.stop(timeout=20)
