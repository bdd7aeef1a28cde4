#!/usr/bin/env python3
"""The operator at scale, on the tests' real control plane (issue 14).

Starts etcd + kube-apiserver + kube-controller-manager from the cached test binaries, one
`isdr scp` and `isdr operator` for one namespace (standalone), one Ready Fingerprint, and N
finished DicomSeries (Succeeded, instances deleted, remembered for SERIES_RETENTION). Then:

  memory      the operator's resident memory (VmRSS) with 0 and with N series, and its peak
              (VmHWM) over a restart with N series
  start-up    a restart with N series and nothing else to do: how long the operator works and
              how many CPU-seconds, and the API requests it sends (the API server's own
              apiserver_request_total, by verb and resource)
  restart     a restart with N series while fresh series arrive (one every 3 s from the
              operator's start): last acknowledged instance -> Job created, minus POST_AFTER
  bursts      --burst series of --instances instances from --senders parallel senders, twice:
              the second while the first burst's Jobs are active (their pods stay Pending: the
              bench runs no node), median and p95 of last acknowledged instance -> Job created
              minus POST_AFTER, and the Job creates (201) and the ones refused as existing (409)

With --run-pods the tests' node agent (tests/support/node_agent.py) runs the Jobs' pods as local
processes (`isdr job`) against the InferenceServer emulator (devtools; every task takes
--pod-seconds) delivering to dcmtk's storescp, so that the second burst arrives while the first
burst's 50 pods really run on the same machine. For each burst it then also prints the operator's
CPU-seconds, the load average, the pods running, and, from the operator's own log, how late the
dispatch decision came ("quiet for" minus POST_AFTER) against how late the bench saw the Job.

Instances go through the real `isdr scp` (pynetdicom C-STORE, one association per series). A
Job's creation time is when the bench's watch on Jobs saw it (creationTimestamp has whole
seconds). The machine is shared: compare figures of the same run (--code runs the operator from
another checkout, e.g. main, for a before/after on the same machine).

    .venv/bin/python scripts/bench_operator.py --series 10000 [--code /work/main]
    .venv/bin/python scripts/bench_operator.py --series 1000 --run-pods
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.kube.resources import GROUP, LABEL_SERIES, VERSION, resource_name  # noqa: E402
from relay.uids import SeriesKey  # noqa: E402
from tests.support.controlplane import ControlPlane  # noqa: E402
from tests.support.chaos import CLAIM  # noqa: E402
from tests.support.dicomseries import create_series, finished_series  # noqa: E402
from tests.support.fingerprints import manifest  # noqa: E402
from tests.support.kube import KubeCluster, assets_dir  # noqa: E402
from tests.support.processes import ManagedProcess, free_port, wait_for_port, wait_until  # noqa: E402

# The resources whose requests are the operator's to count (leases, pods, nodes are the
# control plane's own business).
COUNTED = ("dicomseries", "fingerprints", "jobs", "events", "kopfpeerings")


# --- the operator process: memory, CPU ------------------------------------------------------------


def proc_status(pid: int, field: str) -> float:
    """A /proc/<pid>/status field in MiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine so far, every core (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), sum(fields) / os.sysconf("SC_CLK_TCK")


def settled_rss(pid: int, seconds: float = 5.0) -> float:
    """RSS once it stops growing (the max of a few samples after a pause)."""
    time.sleep(seconds)
    return max(proc_status(pid, "VmRSS") for _ in range(5) if not time.sleep(0.2))


def busy_until_idle(pid: int, since: float, idle: float = 3.0, limit: float = 600.0) -> tuple[float, float]:
    """(seconds from `since` until the process stopped using CPU for `idle` seconds, its CPU-seconds)."""
    last_cpu, last_change = cpu_seconds(pid), time.time()
    while time.time() - since < limit:
        time.sleep(0.25)
        used = cpu_seconds(pid)
        if used - last_cpu > 0.02 * (time.time() - last_change + 0.25):
            last_change = time.time()
        last_cpu = used
        if time.time() - last_change >= idle:
            break
    return last_change - since, last_cpu


# --- the API server's own count of requests -------------------------------------------------------


def request_counts(cluster: KubeCluster) -> Counter:
    """apiserver_request_total by (verb, resource, code), for the counted resources."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter = Counter()
    for family in text_string_to_metric_families(cluster.rest.get("/metrics")):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "apiserver_request_total" and labels.get("resource") in COUNTED:
                resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
                counts[(labels["verb"], resource, labels["code"])] += int(sample.value)
    return counts


def describe_requests(delta: Counter) -> str:
    by_call: Counter = Counter()
    for (verb, resource, code), n in delta.items():
        if verb != "WATCH" and n:
            by_call[f"{verb} {resource}" + (f" ({code})" if code not in ("200", "201") else "")] += n
    return ", ".join(f"{call} {n}" for call, n in sorted(by_call.items())) or "none"


def writes(delta: Counter) -> int:
    return sum(n for (verb, _, _), n in delta.items() if verb in ("POST", "PUT", "PATCH", "DELETE"))


# --- fresh series through the real receiver ---------------------------------------------------------


class JobWatch:
    """When each Job of the namespace was first seen, by its series' name."""

    def __init__(self, cluster: KubeCluster, namespace: str):
        self.cluster, self.namespace = cluster, namespace
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(self.cluster.batch.list_namespaced_job, self.namespace,
                                                  timeout_seconds=30):
                    series = (event["object"].metadata.labels or {}).get(LABEL_SERIES)
                    if series and series not in self.seen:
                        self.seen[series] = time.time()
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a dropped watch: watch again
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()


def make_series(folder: Path, count: int, instances: int) -> list[tuple[SeriesKey, list]]:
    import pydicom

    from isdr_devtools.synthetic import write_ct_series

    made = []
    for index in range(count):
        files = write_ct_series(folder / f"s{index}", count=instances, rows=16, cols=16)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        made.append((SeriesKey(ds.SeriesInstanceUID, ds.SOPClassUID), [pydicom.dcmread(f) for f in files]))
    return made


def send_series(port: int, datasets: list) -> float:
    """C-STORE every dataset in one association; returns when the last one was acknowledged."""
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="ISDR")
    if not association.is_established:
        raise RuntimeError("association refused")
    try:
        for dataset in datasets:
            status = association.send_c_store(dataset)
            if not status or status.Status != 0:
                raise RuntimeError(f"C-STORE failed: {status}")
        return time.time()
    finally:
        association.release()


def latencies(watch: JobWatch, acknowledged: dict[str, float], post_after: float, timeout: float = 300) -> list[float]:
    """Last acknowledged instance -> Job seen, minus POST_AFTER, for every series sent."""
    wait_until(lambda: all(name in watch.seen for name in acknowledged), timeout, "a Job for every series sent")
    return sorted(watch.seen[name] - at - post_after for name, at in acknowledged.items())


def burst(port: int, series: list, senders: int) -> dict[str, float]:
    """Send every series, `senders` at a time; series name -> last instance acknowledged."""
    acknowledged = {}
    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        futures = {pool.submit(send_series, port, datasets): key for key, datasets in series}
        for future in concurrent.futures.as_completed(futures):
            acknowledged[resource_name(futures[future])] = future.result()
    return acknowledged


# "2026-12-02 09:40:01,123 INFO    isdr_operator.series: series 1.2.3: dispatch #1 matched bench: Jobs
# ... (20 instances, quiet for 2.3s)"
DISPATCH_LINE = re.compile(r"^\S+ \S+ .*isdr_operator\.series: series (\S+): dispatch #\d+ .*quiet for ([0-9.]+)s\)",
                           re.MULTILINE)


def decision_delays(log: Path, series_uids: set[str], post_after: float) -> list[float]:
    """From the operator's log: how long after POST_AFTER each of these series was dispatched
    (its own "quiet for" figure, measured from the receiver's last arrival it knew of)."""
    text = log.read_text(errors="replace")
    return sorted(float(quiet) - post_after for uid, quiet in DISPATCH_LINE.findall(text) if uid in series_uids)


def quantiles(values: list[float]) -> str:
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"median {statistics.median(values):.2f} s, p95 {p95:.2f} s, max {values[-1]:.2f} s"


# --- the run ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, work: Path, plane: ControlPlane):
        self.args, self.work = args, work
        self.cluster = KubeCluster(plane.kubeconfig, existing=False, work_dir=work)
        self.cluster.install_crds()
        self.namespace = self.cluster.create_namespace("bench")
        self.pods = Pods(plane, work, args.pod_seconds) if args.run_pods else None
        storage = self.pods.storage(self.namespace) if self.pods else work / "data"
        self.env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig), "INCOMING_DIR": str(storage),
                    "POD_NAMESPACE": self.namespace, "SERIES_RETENTION": "86400", "LOG_LEVEL": "INFO",
                    "POST_AFTER": str(args.post_after), "SCP_AE_TITLE": "ISDR", "JOB_IMAGE": "isdr:bench",
                    "METRICS_PORT": "0", "HEALTH_PORT": "0",  # no fixed ports: others run tests meanwhile
                    **({"STORAGE_PVC_CLAIM": CLAIM} if self.pods else {})}
        self.operator: ManagedProcess | None = None
        self.starts = 0
        self.scp: ManagedProcess | None = None

    def start_scp(self) -> int:
        port = free_port()
        self.scp = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", self.namespace],
                                  self.work / "scp.log", env={**self.env, "SCP_PORT": str(port)}, cwd=ROOT)
        wait_for_port(port, process=self.scp.popen, timeout=60)
        return port

    def start_operator(self) -> float:
        """Start `isdr operator` (from --code if given); returns when it was started."""
        self.starts += 1
        code = Path(self.args.code).resolve() if self.args.code else ROOT
        env = {**self.env, "PYTHONPATH": f"{code}{os.pathsep}{code / 'operator'}"}
        started = time.time()
        self.operator = ManagedProcess([sys.executable, "-m", "relay.cli", "operator", "--namespace", self.namespace,
                                        "--standalone"], self.work / f"operator-{self.starts}.log", env=env, cwd=code)
        return started

    def wait_ready(self) -> float:
        log = self.work / f"operator-{self.starts}.log"
        wait_until(lambda: "operator ready" in log.read_text(errors="replace") or self.operator.poll() is not None,
                   600, "the operator to report ready", interval=0.05)
        if self.operator.poll() is not None:
            raise RuntimeError(f"the operator exited:\n{log.read_text(errors='replace')[-3000:]}")
        return time.time()

    def restart_operator(self) -> float:
        self.operator.stop(timeout=30)
        return self.start_operator()

    def create_fingerprint(self) -> None:
        if self.pods:
            body = manifest("bench", self.pods.emulator.base_url, "toy", self.pods.pacs, modality="^CT$")
            self.cluster.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "fingerprints", body)
            return
        self.cluster.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "fingerprints", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Fingerprint", "metadata": {"name": "bench"},
            "spec": {"match": {"modality": "^CT$"},
                     "inferenceServer": {"url": "http://127.0.0.1:9", "model": "m"},
                     "destinations": [{"host": "127.0.0.1", "port": 104, "aeTitle": "PACS"}]}})

    def create_finished(self, count: int) -> float:
        started = time.time()
        now = time.time()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: create_series(self.cluster.custom, self.namespace, *finished_series(i, now)),
                          range(count)))
        return time.time() - started

    def running_pods(self) -> int:
        pods = self.cluster.core.list_namespaced_pod(self.namespace).items
        return sum(1 for pod in pods if pod.status.phase == "Running")

    def stop(self) -> None:
        for process in (self.operator, self.scp):
            if process is not None:
                process.stop(timeout=30)
        if self.pods:
            self.pods.stop()


class Pods:
    """What runs the Jobs' pods for --run-pods: the node agent (each pod a local process, the
    PVC a shared folder), the InferenceServer emulator the pods submit to, and the PACS
    (dcmtk's storescp) they deliver the predictions to."""

    def __init__(self, plane: ControlPlane, work: Path, pod_seconds: float):
        from tests.support.controlplane import kubelet_args
        from tests.support.dicom_peers import StoreSCP
        from tests.support.emulator import EmulatorProcess
        from tests.support.node_agent import NodeAgentProcess
        from tests.support.processes import require_dcmtk

        require_dcmtk("storescp")
        self.agent = NodeAgentProcess(plane.kubeconfig, work / "node-agent", log_path=work / "node-agent.log",
                                      extra_args=kubelet_args(plane.kubelet_tls))
        self.agent.start()
        self.emulator = EmulatorProcess(work, delay=pod_seconds, name="emulator")
        self.pacs = StoreSCP(work / "pacs").start()

    def storage(self, namespace: str) -> Path:
        folder = self.agent.pvc_path(CLAIM, namespace)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def stop(self) -> None:
        for part in (self.pacs, self.emulator, self.agent):
            part.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=1000, help="finished DicomSeries that exist (default 1000)")
    parser.add_argument("--burst", type=int, default=50, help="series per burst (default 50)")
    parser.add_argument("--instances", type=int, default=20, help="instances per fresh series (default 20)")
    parser.add_argument("--senders", type=int, default=5, help="parallel senders in a burst (default 5)")
    parser.add_argument("--fresh", type=int, default=5, help="series sent during a restart, 3 s apart (default 5)")
    parser.add_argument("--post-after", type=float, default=2.0, help="POST_AFTER of the relay (default 2)")
    parser.add_argument("--code", help="run the operator from this checkout (e.g. /work/main) instead of this one")
    parser.add_argument("--run-pods", action="store_true",
                        help="run the Jobs' pods (the tests' node agent, the InferenceServer emulator, storescp)")
    parser.add_argument("--pod-seconds", type=float, default=25.0,
                        help="with --run-pods: how long the emulator takes for each task (default 25)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, storage) at the end")
    args = parser.parse_args()
    # SIGTERM (also what a background run gets instead of SIGINT) stops every process started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="isdr-bench-operator-"))
    plane = ControlPlane(assets_dir(), work)
    plane.start()
    bench = None
    try:
        bench = Bench(args, work, plane)
        code = args.code or "this checkout"
        print(f"operator from {code}; {args.series} finished DicomSeries; POST_AFTER={args.post_after:g}")
        scp_port = bench.start_scp()
        bench.start_operator()
        bench.wait_ready()
        empty = settled_rss(bench.operator.pid)
        print(f"memory, 0 DicomSeries:            RSS {empty:.0f} MiB")
        bench.create_fingerprint()
        created_in = bench.create_finished(args.series)
        busy_until_idle(bench.operator.pid, time.time())
        loaded = settled_rss(bench.operator.pid)
        print(f"memory, {args.series} DicomSeries (created in {created_in:.0f} s): RSS {loaded:.0f} MiB "
              f"(+{(loaded - empty) * 1024 / max(1, args.series):.1f} KiB per series)")

        # A restart with nothing to do but the series that exist.
        before = request_counts(bench.cluster)
        started = bench.restart_operator()
        ready = bench.wait_ready()
        busy, cpu = busy_until_idle(bench.operator.pid, started)
        delta = request_counts(bench.cluster) - before
        rss, peak = proc_status(bench.operator.pid, "VmRSS"), proc_status(bench.operator.pid, "VmHWM")
        print(f"start-up with {args.series}: ready after {ready - started:.1f} s, busy for {busy:.1f} s, "
              f"{cpu:.1f} CPU-seconds; RSS {rss:.0f} MiB, peak {peak:.0f} MiB")
        print(f"  API requests: {describe_requests(delta)} ({writes(delta)} writes)")

        watch = JobWatch(bench.cluster, bench.namespace)
        fresh = make_series(work / "fresh", args.fresh + 2 * args.burst, args.instances)
        during, first, second = (fresh[:args.fresh], fresh[args.fresh:args.fresh + args.burst],
                                 fresh[args.fresh + args.burst:])

        # A restart while fresh series arrive, one every 3 s from the operator's start.
        before = request_counts(bench.cluster)
        started = bench.restart_operator()
        acknowledged = {}
        for index, (key, datasets) in enumerate(during):
            time.sleep(max(0.0, started + 3 * index - time.time()))
            acknowledged[resource_name(key)] = send_series(scp_port, datasets)
        waited = latencies(watch, acknowledged, args.post_after)
        peak = proc_status(bench.operator.pid, "VmHWM")
        print(f"restart with {args.series} while {len(during)} series arrive: {quantiles(waited)} "
              f"(each: {', '.join(f'{w:.2f}' for w in sorted(waited))}); peak RSS {peak:.0f} MiB")

        active = "running" if args.run_pods else "active"
        for label, series in (("burst", first), (f"burst while the first burst's Jobs are {active}", second)):
            before = request_counts(bench.cluster)
            cpu_before, load_before = cpu_seconds(bench.operator.pid), os.getloadavg()[0]
            machine_before = machine_cpu()
            pods_before = bench.running_pods() if args.run_pods else 0
            acknowledged = burst(scp_port, series, args.senders)
            waited = latencies(watch, acknowledged, args.post_after)
            cpu, load = cpu_seconds(bench.operator.pid) - cpu_before, os.getloadavg()[0]
            busy, total = (after - before for after, before in zip(machine_cpu(), machine_before))
            pods_after = bench.running_pods() if args.run_pods else 0
            time.sleep(args.post_after + 3)  # what the operator does after the dispatches
            delta = request_counts(bench.cluster) - before
            creates = {code: n for (verb, resource, code), n in delta.items() if (verb, resource) == ("POST", "jobs")}
            print(f"{label} ({len(series)} series x {args.instances} instances, {args.senders} senders): "
                  f"{quantiles(waited)}; Job creates {creates}")
            decided = decision_delays(bench.operator.log_path, {key.series_uid for key, _ in series}, args.post_after)
            if decided:
                print(f"  dispatch decided (operator's log, quiet for - POST_AFTER): {quantiles(decided)}")
            print(f"  until the last Job: operator {cpu:.1f} CPU-seconds, machine {busy / total:.0%} busy "
                  f"({os.cpu_count()} cores); load average {load_before:.1f} -> {load:.1f}"
                  + (f"; pods running {pods_before} -> {pods_after}" if args.run_pods else ""))
            print(f"  API requests: {describe_requests(delta)}")
        watch.stop()
        alive = bench.operator.poll() is None
        print(f"operator alive: {alive}; final RSS {proc_status(bench.operator.pid, 'VmRSS'):.0f} MiB, "
              f"peak {proc_status(bench.operator.pid, 'VmHWM'):.0f} MiB")
        return 0 if alive else 1
    finally:
        if bench is not None:
            bench.stop()
        plane.stop()
        if args.keep:
            print(f"logs and storage kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
