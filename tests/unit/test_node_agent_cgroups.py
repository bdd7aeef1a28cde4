"""The node agent weighs its pods' CPU as a kubelet does (tests/support/pod_cgroups.py): the
pods share the node's allocatable CPU in proportion to their requests."""

from __future__ import annotations

import os

from tests.support.pod_cgroups import PodCgroups, join, pod_cpu_request, shares, weight


def test_a_request_gives_the_kubelets_shares_and_weight():
    assert shares(100) == 102 and shares(2000) == 2048
    assert shares(0) == 2  # BestEffort
    assert weight(2) == 1 and weight(1024) == 39 and weight(262144) == 10000


def test_a_pods_request_is_the_sum_of_its_containers_and_a_limit_alone_counts():
    spec = {"containers": [{"resources": {"requests": {"cpu": "100m"}}},
                           {"resources": {"limits": {"cpu": "0.5"}}}, {}]}
    assert pod_cpu_request(spec) == 600
    assert pod_cpu_request({"containers": [{}]}) == 0


def test_pods_get_a_cgroup_each_under_the_nodes_weighted_by_their_request(tmp_path):
    (tmp_path / "cpu.shares").write_text("1024")  # a cgroup v1 cpu controller
    cgroups = PodCgroups("kubepods", 2000, bases=((tmp_path, False),))
    assert cgroups.available and (tmp_path / "kubepods" / "cpu.shares").read_text() == "2048"
    group = cgroups.pod("u1", 100)
    assert group == tmp_path / "kubepods" / "podu1" and (group / "cpu.shares").read_text() == "102"
    join(group)  # what the pod's process does before exec: it writes its pid
    assert (group / "cgroup.procs").read_text() == str(os.getpid())


def test_without_a_writable_cpu_controller_pods_run_as_plain_processes(tmp_path):
    cgroups = PodCgroups("kubepods", 2000, bases=((tmp_path / "none", False), (tmp_path, True)))
    assert not cgroups.available and cgroups.pod("u1", 100) is None
    join(None)  # nothing to join
