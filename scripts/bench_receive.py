#!/usr/bin/env python3
"""Receive throughput of `isdr run` next to dcmtk's storescp, measured in the same run.

Two workloads, each sent by dcmtk's storescu over loopback in one association:
  * a 300-instance 512x512 CT series (about 150 MiB)
  * 2000 small instances
Receivers, each started fresh for every round:
  * storescp        dcmtk's own SCP (the reference)
  * bare-pynetdicom a pynetdicom handler that only writes event.encoded_dataset() to a file
  * isdr-run        the relay (validates, fsyncs before answering, registers the series)
Prints instances per second (median of --rounds) and the ratios to storescp and to the bare
pynetdicom handler.

    python scripts/bench_receive.py [--rounds 3] [--data benchmark-data]
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

BARE_PYNETDICOM = textwrap.dedent("""
    import sys, uuid
    from pathlib import Path
    from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
    out = Path(sys.argv[2])
    def handle(event):
        with open(out / uuid.uuid4().hex, "wb") as f:
            f.write(event.encoded_dataset())
        return 0
    ae = AE(ae_title="BARE")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def dcmtk_env() -> dict:
    return {**os.environ, "TCP_NODELAY": "1"}


def start_receiver(kind: str, port: int, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "storescp":
        args, env = [STORESCP, "-aet", "BENCH", "--output-directory", str(out), str(port)], dcmtk_env()
    elif kind == "bare-pynetdicom":
        args, env = [sys.executable, "-c", BARE_PYNETDICOM, str(port), str(out)], dict(os.environ)
    else:
        fingerprints = out / "fingerprints"
        fingerprints.mkdir()
        env = {**os.environ, "SCP_PORT": str(port), "SCP_HOSTNAME": "127.0.0.1", "SCP_AE_TITLE": "BENCH",
               "INCOMING_DIR": str(out / "data"), "FINGERPRINT_DIR": str(fingerprints),
               "POST_AFTER": "3600", "LOG_LEVEL": "WARNING"}
        args = [sys.executable, "-m", "relay.cli", "run"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=ROOT)
    wait_for_port(port)
    return process


def send(port: int, folder: Path, called_ae: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([STORESCU, "-aet", "SENDER", "-aec", called_ae, "+sd", "+r",
                             "127.0.0.1", str(port), str(folder)],
                            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stdout[-2000:]}")
    return elapsed


def measure(kind: str, folder: Path, count: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
            port = free_port()
            process = start_receiver(kind, port, Path(tmp))
            try:
                called = "BARE" if kind == "bare-pynetdicom" else "BENCH"
                rates.append(count / send(port, folder, called))
            finally:
                process.terminate()
                process.wait(timeout=20)
    return statistics.median(rates)


def prepare(data: Path) -> dict[str, tuple[Path, int]]:
    ct, small = data / "ct-300-512", data / "small-2000"
    if not ct.exists():
        print("generating 300 CT instances of 512x512 ...", flush=True)
        write_ct_series(ct, count=300, rows=512, cols=512)
    if not small.exists():
        print("generating 2000 small instances ...", flush=True)
        write_small_instances(small, count=2000)
    return {"300 CT 512x512": (ct, 300), "2000 small": (small, 2000)}


def ratio(rate: float, reference: float | None) -> str:
    return f"{rate / reference:.2f}" if reference else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per receiver and workload (median)")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmark-data", help="where the test files are kept")
    parser.add_argument("--receivers", default="storescp,bare-pynetdicom,isdr-run")
    args = parser.parse_args()
    if find_dcmtk("storescu") is None:
        print("dcmtk is not installed (make system-deps)", file=sys.stderr)
        return 2
    receivers = args.receivers.split(",")
    print(f"{'workload':<16} {'receiver':<16} {'inst/s':>8} {'vs storescp':>11} {'vs bare':>8}")
    for name, (folder, count) in prepare(args.data).items():
        rates: dict[str, float] = {}
        for kind in receivers:
            rate = rates[kind] = measure(kind, folder, count, args.rounds)
            print(f"{name:<16} {kind:<16} {rate:8.1f} {ratio(rate, rates.get('storescp')):>11} "
                  f"{ratio(rate, rates.get('bare-pynetdicom')):>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
