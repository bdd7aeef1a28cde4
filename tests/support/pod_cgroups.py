"""The kubelet's CPU weights, for the pods the node agent runs as local processes.

A kubelet puts every pod under one parent cgroup ("kubepods") weighted by the node's allocatable
CPU, and each pod in a cgroup of its own weighted by its containers' CPU requests (cpu.shares =
millicores * 1024 / 1000, at least 2; a BestEffort pod gets 2). So fifty Job pods that start at
once share what the node gives pods, in proportion to their requests, and a process outside the
pods (here: the API server, etcd, the operator the benchmark runs) is not starved by their
number. Without that, fifty local Python processes each had one equal share of the machine.

cgroup v1 (cpu.shares) and v2 (cpu.weight, converted as the kubelet does); where the cpu
controller cannot be written (no root, no delegation), pods run as plain processes and
`available` says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("node_agent.cgroups")

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
MIN_SHARES = 2


def shares(millicores: int) -> int:
    """cpu.shares for a CPU request (the kubelet's MilliCPUToShares)."""
    return max(MIN_SHARES, millicores * 1024 // 1000)


def weight(cpu_shares: int) -> int:
    """cgroup v2 cpu.weight for cpu.shares (the kubelet's CpuSharesToCpuWeight)."""
    return 1 + ((cpu_shares - 2) * 9999) // 262142


def cpu_millicores(quantity: str | None) -> int:
    if not quantity:
        return 0
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def pod_cpu_request(spec: dict) -> int:
    """The pod's CPU request in millicores: its containers' requests (a limit alone counts as
    the request, as the API server defaults it)."""
    total = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        total += cpu_millicores((resources.get("requests") or {}).get("cpu")
                                or (resources.get("limits") or {}).get("cpu"))
    return total


class PodCgroups:
    def __init__(self, name: str, allocatable_millicores: int,
                 bases: tuple[tuple[Path, bool], ...] = ((V1_CPU, False), (V2_ROOT, True))):
        """`bases`: where to look for a cpu controller, (path, whether cgroup v2), in order."""
        self.root: Path | None = None
        self.v2 = False
        for base, v2 in bases:
            if self._usable(base, v2):
                try:
                    self.root = base / name
                    self.v2 = v2
                    self.root.mkdir(exist_ok=True)
                    if v2:
                        (self.root / "cgroup.subtree_control").write_text("+cpu")
                    self._weigh(self.root, shares(allocatable_millicores))
                    break
                except OSError as exc:
                    log.warning("no CPU weights for pods in %s: %s", base, exc)
                    self.root = None
        if self.root is None:
            log.warning("pods run without the kubelet's CPU weights: no writable cgroup cpu controller")

    @staticmethod
    def _usable(base: Path, v2: bool) -> bool:
        if v2:
            controllers = base / "cgroup.controllers"
            return controllers.exists() and "cpu" in controllers.read_text().split() and os.access(base, os.W_OK)
        return (base / "cpu.shares").exists() and os.access(base, os.W_OK)

    @property
    def available(self) -> bool:
        return self.root is not None

    def _weigh(self, group: Path, cpu_shares: int) -> None:
        if self.v2:
            (group / "cpu.weight").write_text(str(weight(cpu_shares)))
        else:
            (group / "cpu.shares").write_text(str(cpu_shares))

    def pod(self, uid: str, millicores: int) -> Path | None:
        """The cgroup of pod `uid`, made and weighted (None: none here)."""
        if self.root is None:
            return None
        group = self.root / f"pod{uid}"
        try:
            group.mkdir(exist_ok=True)
            self._weigh(group, shares(millicores))
        except OSError as exc:
            log.warning("pod %s runs without its CPU weight: %s", uid, exc)
            return None
        return group

    def remove(self, uid: str) -> None:
        if self.root is not None:
            _rmdir(self.root / f"pod{uid}")

    def close(self) -> None:
        if self.root is None:
            return
        for group in self.root.glob("pod*"):
            _rmdir(group)
        _rmdir(self.root)


def join(group: Path | None) -> None:
    """In a child before exec (preexec_fn): move this process into `group`."""
    if group is not None:
        with open(group / "cgroup.procs", "w") as procs:
            procs.write(str(os.getpid()))


def _rmdir(group: Path) -> None:
    try:
        group.rmdir()  # only once no process is left in it
    except OSError:
        pass
