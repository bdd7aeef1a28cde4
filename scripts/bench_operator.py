#!/usr/bin/env python3
"""The operator's memory with many DicomSeries, on the tests' real control plane.

Starts etcd + kube-apiserver (+ controller-manager) from the cached test binaries, runs
`isdr operator` for one namespace, and reads its resident memory (VmRSS) twice: with no
DicomSeries, and after N finished DicomSeries (Succeeded, instances deleted, remembered for
SERIES_RETENTION) plus one Ready Fingerprint have been created and the operator has looked at
every one of them.

    .venv/bin/python scripts/bench_operator.py [--series 500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.kube.resources import GROUP, VERSION, resource_name, to_rfc3339  # noqa: E402
from relay.kube.resources import SERIES_PLURAL as PLURAL  # noqa: E402
from relay.uids import SeriesKey  # noqa: E402
from tests.support.controlplane import ControlPlane  # noqa: E402
from tests.support.kube import KubeCluster, assets_dir  # noqa: E402
from tests.support.processes import ManagedProcess, wait_until  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settled_rss(pid: int, seconds: float = 5.0) -> float:
    """RSS once it stops growing (the max of a few samples after a pause)."""
    time.sleep(seconds)
    return max(rss_mib(pid) for _ in range(5) if not time.sleep(0.2))


def series_body(index: int, now: float) -> dict:
    key = SeriesKey(f"1.2.826.0.1.3680043.10.1.{index}", "1.2.840.10008.5.1.4.1.1.2")
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DicomSeries",
        "metadata": {"name": resource_name(key)},
        "spec": {"seriesInstanceUID": key.series_uid, "sopClassUID": key.sop_class_uid, "modality": "CT",
                 "seriesDescription": f"bench {index}", "studyDescription": "bench",
                 "storage": {"type": "local", "prefix": key.prefix}},
    }, {
        "instances": 200, "firstReceived": to_rfc3339(now - 60), "lastReceived": to_rfc3339(now - 50),
        "phase": "Succeeded", "generation": 1, "dispatchedInstances": 200, "instancesDeleted": True,
        "completedTime": to_rfc3339(now - 10), "progress": "1/1",
        "tasks": [{"taskId": f"bench-{index}-1", "fingerprint": "bench", "generation": 1,
                   "job": f"bench-{index}-1", "phase": "Succeeded", "inferenceTaskUID": f"uid{index}"}],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="isdr-bench-operator-"))
    plane = ControlPlane(assets_dir(), work)
    plane.start()
    operator = None
    try:
        cluster = KubeCluster(plane.kubeconfig, existing=False, work_dir=work)
        cluster.install_crds()
        namespace = cluster.create_namespace("bench")
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "INCOMING_DIR": str(work / "data"),
               "SERIES_RETENTION": "86400", "LOG_LEVEL": "WARNING"}
        operator = ManagedProcess([sys.executable, "-m", "relay.cli", "operator", "--namespace", namespace,
                                   "--standalone"], work / "operator.log", env=env, cwd=ROOT)
        time.sleep(8)
        empty = settled_rss(operator.pid)
        custom = cluster.custom
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "fingerprints", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Fingerprint", "metadata": {"name": "bench"},
            "spec": {"match": {"modality": "^CT$"}, "inferenceServer": {"url": "http://127.0.0.1:9", "model": "m"},
                     "destinations": [{"host": "127.0.0.1", "port": 104, "aeTitle": "PACS"}]}})
        started = time.time()
        for index in range(args.series):
            body, status = series_body(index, time.time())
            created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, created["metadata"]["name"], {"status": status},
                _content_type="application/merge-patch+json")
        created_in = time.time() - started
        wait_until(lambda: len(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"])
                   == args.series, 60, "all series listed")
        loaded = settled_rss(operator.pid, seconds=10)
        alive = operator.poll() is None
        print(f"operator RSS with 0 DicomSeries: {empty:.1f} MiB")
        print(f"operator RSS with {args.series} DicomSeries: {loaded:.1f} MiB "
              f"(+{loaded - empty:.1f} MiB, {(loaded - empty) * 1024 / args.series:.1f} KiB per series); "
              f"created in {created_in:.1f}s; operator alive: {alive}")
        return 0 if alive else 1
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
