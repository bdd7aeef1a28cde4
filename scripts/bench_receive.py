#!/usr/bin/env python3
"""Receive throughput of the relay next to dcmtk's storescp, measured in the same run.

Workloads, each sent by dcmtk's storescu (TCP_NODELAY=1) over loopback:
  * 300 CT instances of 512x512 (about 150 MiB)
  * 2000 small instances
each over 1 association and over 4 (the files split in four, four storescu at once).
Receivers, each started fresh for every round:
  * storescp         dcmtk's SCP, the reference on 1 association (it does not fsync)
  * storescp-fork    storescp --fork, one process per association: the reference on 4
  * bare-pynetdicom  a pynetdicom handler that only writes event.encoded_dataset() to a file
  * isdr-run         the relay in one process (validates, makes each instance durable through
                     the storage journal before answering, registers the series)
  * isdr-run-classic the same with STORAGE_JOURNAL=false: an fdatasync of each file and an
                     fsync of its folder before answering (what the relay did before the journal)
  * isdr-scp         the Kubernetes receiver, its publishing pointed at an API server that is
                     not there (instances are stored and queued for publishing)
The rounds alternate between the receivers (round 1 of each, then round 2, ...), so that a
change of the machine's load touches them all. Prints, per workload and association count, the
median of --rounds of instances per second and their range, the ratio of the medians to the
reference, the receiver's CPU seconds per instance (its own and its children's) and its peak
RSS; first the disk's fsync latency and the relay's durable put (journaled and classic), which
bound every receiver that makes each instance durable before answering: on one association the
line "(fsync ceiling)" is the reference's rate slowed by one journaled put per instance; and
the load average before each workload.

    python scripts/bench_receive.py [--rounds 3] [--data benchmark-data] [--associations 1,4]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from isdr_devtools.synthetic import write_ct_series, write_small_instances  # noqa: E402
from tests.support.processes import find_dcmtk  # noqa: E402

STORESCU = find_dcmtk("storescu") or "storescu"
STORESCP = find_dcmtk("storescp") or "storescp"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

BARE_PYNETDICOM = textwrap.dedent("""
    import sys, uuid
    from pathlib import Path
    from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
    out = Path(sys.argv[2])
    def handle(event):
        with open(out / uuid.uuid4().hex, "wb") as f:
            f.write(event.encoded_dataset())
        return 0
    ae = AE(ae_title="BENCH")
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
""")

NOWHERE_KUBECONFIG = textwrap.dedent("""
    apiVersion: v1
    kind: Config
    clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}]
    users: [{name: nobody, user: {token: none}}]
    contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody, namespace: bench}}]
    current-context: nowhere
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> bool:
    """True once `port` listens; False if the process ended first or nothing listens in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def dcmtk_env() -> dict:
    return {**os.environ, "TCP_NODELAY": "1"}


def start_receiver(kind: str, port: int, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    relay_env = {**os.environ, "SCP_PORT": str(port), "SCP_HOSTNAME": "127.0.0.1", "SCP_AE_TITLE": "BENCH",
                 "INCOMING_DIR": str(out / "data"), "LOG_LEVEL": "WARNING",
                 "METRICS_PORT": "0", "HEALTH_PORT": "0"}  # no fixed ports: an orphan must not block the tests
    if kind in ("storescp", "storescp-fork"):
        fork = ["--fork"] if kind == "storescp-fork" else []
        args, env = [STORESCP, *fork, "-aet", "BENCH", "--output-directory", str(out), str(port)], dcmtk_env()
    elif kind == "bare-pynetdicom":
        args, env = [sys.executable, "-c", BARE_PYNETDICOM, str(port), str(out)], dict(os.environ)
    elif kind in ("isdr-run", "isdr-run-classic"):
        fingerprints = out / "fingerprints"
        fingerprints.mkdir()
        env = {**relay_env, "FINGERPRINT_DIR": str(fingerprints), "POST_AFTER": "3600",
               "STORAGE_JOURNAL": "false" if kind == "isdr-run-classic" else "true"}
        args = [sys.executable, "-m", "relay.cli", "run"]
    elif kind == "isdr-scp":
        kubeconfig = out / "kubeconfig"
        kubeconfig.write_text(NOWHERE_KUBECONFIG.replace("{port}", str(free_port())))
        env = {**relay_env, "KUBECONFIG": str(kubeconfig), "POD_NAME": "bench"}
        args = [sys.executable, "-m", "relay.cli", "scp", "--drain-timeout", "0", "--flush-timeout", "0"]
    else:
        raise ValueError(kind)
    log = out / f"{kind}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
    if not wait_for_port(port, process):
        process.kill()
        process.wait()
        raise ReceiverDidNotStart(f"{kind} did not listen on {port}: {log.read_text(errors='replace')[-1000:]}")
    return process


class ReceiverDidNotStart(RuntimeError):
    pass


def send(port: int, folders: list[Path]) -> float:
    """Send each folder over its own association, all at once; seconds until the last is done."""
    started = time.perf_counter()
    senders = [subprocess.Popen([STORESCU, "-aet", "SENDER", "-aec", "BENCH", "+sd", "+r", "127.0.0.1", str(port),
                                 str(folder)], env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for folder in folders]
    outputs = [sender.communicate()[0] for sender in senders]
    elapsed = time.perf_counter() - started
    for sender, output in zip(senders, outputs):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {output[-2000:]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children that it waited for (storescp --fork)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_once(kind: str, folders: list[Path], count: int) -> tuple[float, float, int]:
    """(instances per second, CPU seconds per instance, peak RSS) of one round."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-", dir=ROOT) as tmp:
        port = free_port()
        try:
            process = start_receiver(kind, port, Path(tmp) / "first")
        except ReceiverDidNotStart as exc:  # e.g. another program took the free port meanwhile
            print(f"({exc}; trying another port)", file=sys.stderr, flush=True)
            port = free_port()
            process = start_receiver(kind, port, Path(tmp) / "second")
        try:
            cpu_before = cpu_seconds(process.pid)
            rate = count / send(port, folders)
            time.sleep(0.2)  # let storescp --fork reap its children, so their CPU is counted
            return rate, (cpu_seconds(process.pid) - cpu_before) / count, peak_rss(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)


def measure(kinds: list[str], folders: list[Path], count: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each receiver's medians over `rounds`, the rounds alternating between the receivers."""
    samples: dict[str, list[tuple[float, float, int]]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            samples[kind].append(measure_once(kind, folders, count))
    results = {}
    for kind, rounds_of_kind in samples.items():
        rates, cpu, rss = zip(*rounds_of_kind)
        results[kind] = {"rate": statistics.median(rates), "low": min(rates), "high": max(rates),
                         "cpu": statistics.median(cpu), "rss": statistics.median(rss)}
    return results


def split(folder: Path, parts: int) -> list[Path]:
    """The workload's files in `parts` sub-folders (made once, as links), one per association."""
    if parts == 1:
        return [folder]
    target = folder.parent / f"{folder.name}-in-{parts}"
    if not target.exists():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for index, path in enumerate(files):
            part = target / f"part{index % parts}"
            part.mkdir(parents=True, exist_ok=True)
            os.link(path, part / path.name)
    return sorted(p for p in target.iterdir() if p.is_dir())


def prepare(data: Path) -> dict[str, tuple[Path, int]]:
    ct, small = data / "ct-300-512", data / "small-2000"
    if not ct.exists():
        print("generating 300 CT instances of 512x512 ...", flush=True)
        write_ct_series(ct, count=300, rows=512, cols=512)
    if not small.exists():
        print("generating 2000 small instances ...", flush=True)
        write_small_instances(small, count=2000)
    return {"300 CT 512x512": (ct, 300), "2000 small": (small, 2000)}


def fsync_latency(folder: Path, size: int, count: int) -> float:
    """Seconds to create, write and fsync one file of `size` bytes, on the disk under `folder`."""
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=folder) as tmp:
        started = time.perf_counter()
        for index in range(count):
            fd = os.open(os.path.join(tmp, str(index)), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
        return (time.perf_counter() - started) / count


def durable_put_latency(folder: Path, size: int, count: int, journal: bool) -> float:
    """Seconds per object the relay's local storage takes to make `size` bytes durable under a new
    key: what every acknowledged instance costs on top of receiving it, on one association.
    Journaled: temporary file, journal record and its fdatasync, rename (the checkpoint runs in
    the background, as in the relay); classic: temporary file, fdatasync, rename, folder fsync."""
    from relay.storage.local import LocalStorage

    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="bench-put-", dir=folder) as tmp:
        storage = LocalStorage(Path(tmp), journal=journal)
        try:
            started = time.perf_counter()
            for index in range(count):
                storage.put(f"series/1.2.3/1.2.4/{index}.dcm", (data,))
            return (time.perf_counter() - started) / count
        finally:
            storage.close()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per receiver and workload (median)")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmark-data", help="where the test files are kept")
    parser.add_argument("--receivers",
                        default="storescp,storescp-fork,bare-pynetdicom,isdr-run,isdr-run-classic,isdr-scp")
    parser.add_argument("--associations", default="1,4", help="association counts to measure")
    parser.add_argument("--workloads", default="ct,small", help="ct, small or both")
    args = parser.parse_args()
    if find_dcmtk("storescu") is None:
        print("dcmtk is not installed (make system-deps)", file=sys.stderr)
        return 2
    receivers = args.receivers.split(",")
    workloads = {name: value for name, value in prepare(args.data).items()
                 if ("ct" if "CT" in name else "small") in args.workloads.split(",")}
    put_seconds = {name: {journal: durable_put_latency(ROOT, size, count, journal) for journal in (True, False)}
                   for name, size, count in (("300 CT 512x512", 525_000, 100), ("2000 small", 9_000, 200))}
    print(f"disk under {ROOT}: create+write+fsync of a 513 KB file {fsync_latency(ROOT, 525_000, 100) * 1000:.2f} ms, "
          f"of a 9 KB file {fsync_latency(ROOT, 9_000, 200) * 1000:.2f} ms")
    for name, seconds in put_seconds.items():
        print(f"the relay's durable put, {name} instance: journaled {seconds[True] * 1000:.2f} ms, classic "
              f"(fdatasync, rename, folder fsync) {seconds[False] * 1000:.2f} ms")
    print(f"{'workload':<16} {'assoc':>5} {'receiver':<16} {'inst/s':>8} {'range':>11} {'ratio':>6} "
          f"{'CPU ms/inst':>11} {'peak RSS MiB':>12}")
    for name, (folder, count) in workloads.items():
        for associations in (int(a) for a in args.associations.split(",")):
            print(f"load average {load_average()}", flush=True)
            folders = split(folder, associations)
            reference_kind = "storescp" if associations == 1 else "storescp-fork"
            kinds = [kind for kind in receivers if kind not in ("storescp", "storescp-fork") or kind == reference_kind]
            results = measure(kinds, folders, count, args.rounds)
            reference = results[reference_kind]["rate"] if reference_kind in results else None
            for kind in kinds:
                result = results[kind]
                ratio = f"{result['rate'] / reference:.2f}" if reference else "-"
                spread = f"{result['low']:.0f}-{result['high']:.0f}"
                print(f"{name:<16} {associations:>5} {kind:<16} {result['rate']:8.1f} {spread:>11} {ratio:>6} "
                      f"{result['cpu'] * 1000:11.2f} {result['rss'] / 2**20:12.0f}", flush=True)
                if kind == reference_kind and associations == 1:
                    # The reference's time per instance plus one durable put, with nothing else:
                    # the most that any receiver that is durable per instance can do here.
                    ceiling = 1 / (1 / reference + put_seconds[name][True])
                    print(f"{name:<16} {associations:>5} {'(fsync ceiling)':<16} {ceiling:8.1f} {'':>11} "
                          f"{ceiling / reference:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
