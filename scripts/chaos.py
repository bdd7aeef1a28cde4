#!/usr/bin/env python3
"""The crash test, long runs: senders stream series while the relay is killed with SIGKILL.

    .venv/bin/python scripts/chaos.py run  --kills 50 --series 300   # isdr run
    .venv/bin/python scripts/chaos.py kube --kills 50 --series 100   # isdr scp + operator + Job pods,
                                                                      # on the test control plane

Prints a table (acknowledged instances, lost, duplicate submits counted at the InferenceServer,
kills inside the accept-to-record window and the window's width, tasks wrongly Failed, series
stuck, duplicates at the destination) and exits 1 when a target is missed. The short runs of the
test suite (tests/integration/test_chaos.py, tests/kube/test_operator_chaos.py) are the same code with
about 10 kills. Needs what `make test` installs (dcmtk, the .venv, the Kubernetes binaries).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.chaos import ChaosConfig, run_chaos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "kube"], help="isdr run, or the Kubernetes mode")
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs (default: %(default)s)")
    parser.add_argument("--series", type=int, default=300, help="series to send (default: %(default)s)")
    parser.add_argument("--senders", type=int, default=3, help="senders at once (default: %(default)s)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                        help="seconds between kills, uniformly at random (default: 1 4)")
    parser.add_argument("--model-seconds", type=float, default=0.5,
                        help="how long the emulator's model takes; longer keeps more tasks (and, on "
                        "Kubernetes, Job pods) running to be killed (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="where everything goes (default: a new temporary folder)")
    parser.add_argument("--settle-timeout", type=float, default=600.0,
                        help="how long everything may take to finish after the last kill (default: %(default)s)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"isdr-chaos-{args.mode}-"))
    config = ChaosConfig(mode=args.mode, kills=args.kills, series=args.series, workdir=workdir,
                         senders=args.senders, kill_every=tuple(args.kill_every), seed=args.seed,
                         settle_timeout=args.settle_timeout, emulator_delay=args.model_seconds)
    print(f"chaos: {args.mode}, {args.kills} kills, {args.series} series; everything in {workdir}", flush=True)
    if args.mode == "kube":
        report = _with_control_plane(config, workdir)
    else:
        report = run_chaos(config)
    print(report.table())
    problems = report.violations()
    for line in report.lost[:20]:
        print(f"lost: {line}")
    for line in (report.tasks_failed + report.tasks_given_up)[:20]:
        print(f"failed: {line}")
    for line in report.stuck[:20]:
        print(f"stuck: {line}")
    print("targets met" if not problems else "TARGETS MISSED: " + "; ".join(problems))
    return 1 if problems else 0


def _with_control_plane(config: ChaosConfig, workdir: Path):
    from tests.support.controlplane import ControlPlane
    from tests.support.kube import KubeCluster, assets_dir
    from tests.support.node_agent import NodeAgentProcess

    control_plane = ControlPlane(assets_dir(), workdir / "kube")
    control_plane.start()
    agent = None
    try:
        cluster = KubeCluster(control_plane.kubeconfig, existing=False, work_dir=workdir / "kube",
                              control_plane=control_plane)
        cluster.install_crds()
        agent = NodeAgentProcess(control_plane.kubeconfig, workdir / "kube" / "node-agent",
                                 log_path=workdir / "kube" / "logs" / "node-agent.log")
        agent.start()
        cluster.node_agent = agent
        namespace = cluster.create_namespace("chaos")
        return run_chaos(config, cluster, agent, namespace)
    finally:
        if agent is not None:
            agent.stop()
        control_plane.stop()


if __name__ == "__main__":
    raise SystemExit(main())
