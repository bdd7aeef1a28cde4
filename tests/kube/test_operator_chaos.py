"""The crash test, short, in the Kubernetes mode: `isdr scp`, `isdr operator` and the Jobs' pods
killed with SIGKILL ten times at random moments while three senders stream series, on the test
control plane (tests/support/chaos.py says what is counted; scripts/chaos.py runs the long one)."""

import pytest

from tests.support.chaos import ChaosConfig, run_chaos
from tests.support.processes import require_dcmtk

pytestmark = pytest.mark.kube


def test_ten_random_kills_in_the_kubernetes_mode_lose_nothing_and_run_nothing_twice(
        kube_cluster, node_agent, kube_namespace, tmp_path):
    require_dcmtk("storescp")
    if node_agent is None:
        pytest.skip("the Job pods run through the local node agent")
    report = run_chaos(ChaosConfig(mode="kube", kills=10, series=12, workdir=tmp_path, seed=11,
                                   settle_timeout=300),
                       kube_cluster, node_agent, kube_namespace)
    print(report.table())
    assert len(report.kills) == 10 and report.acknowledged > 0 and report.deliveries > 0
    assert not report.violations(), "\n".join([report.table(), *report.stuck, *report.tasks_failed,
                                              *map(str, report.lost)])
