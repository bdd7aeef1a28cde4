"""The relay as the Kubernetes tests run it: `isdr scp` and `isdr operator` as processes for one
namespace, with the helpers the test modules share (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from relay.kube.resources import GROUP, LABEL_SERIES, VERSION, resource_name
from relay.kube.resources import SERIES_PLURAL as PLURAL
from relay.uids import SeriesKey
from tests.support.chaos import CLAIM, kube_relay_env
from tests.support.dicom_peers import storescu
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until, ManagedProcess, free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class Relay:
    """isdr scp + isdr operator for one namespace, sharing the PVC folder the Jobs mount."""

    def __init__(self, cluster, agent, namespace: str, workdir: Path, env: dict | None = None):
        self.cluster, self.agent, self.namespace, self.workdir = cluster, agent, namespace, workdir
        self.storage_dir = agent.pvc_path(CLAIM, namespace)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.scp_port = free_port()
        self.env = kube_relay_env(cluster, namespace, self.storage_dir, self.scp_port, **(env or {}))
        self.scp = self.operator = None
        self.operator_starts = 0
        self.health_port = free_port()

    def start(self) -> "Relay":
        self.scp = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", self.namespace],
                                  self.workdir / "scp.log", env=self.env, cwd=REPO_ROOT)
        wait_for_port(self.scp_port, process=self.scp.popen, timeout=60)
        self.start_operator()
        return self

    def start_operator(self) -> None:
        self.operator_starts += 1
        self.operator = ManagedProcess(
            [sys.executable, "-m", "relay.cli", "operator", "--namespace", self.namespace, "--peering", "isdr",
             "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
            self.workdir / f"operator-{self.operator_starts}.log", env=self.env, cwd=REPO_ROOT)
        wait_until(lambda: "operator ready" in self.operator_log() or self.operator.poll() is not None,
                   60, "the operator to start")
        assert self.operator.poll() is None, self.operator_log()

    def health(self) -> tuple[int, dict]:
        """What the chart's livenessProbe would see."""
        import requests

        response = requests.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=10)
        return response.status_code, response.json()

    def scp_log(self) -> str:
        return (self.workdir / "scp.log").read_text(errors="replace")

    def operator_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("operator-*.log")))

    def stop(self) -> None:
        for process in (self.operator, self.scp):
            if process is not None:
                process.stop(timeout=20)

    def send(self, files) -> float:
        result = storescu(self.scp_port, files, called_ae="ISDR")
        assert result.returncode == 0, result.stdout
        return time.time()

    # --- reading the cluster ---

    def series(self, key: SeriesKey) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.cluster.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                     resource_name(key))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def fingerprint(self, name: str) -> dict:
        return self.cluster.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "fingerprints",
                                                                 name)

    def jobs(self, key: SeriesKey) -> list:
        return self.cluster.batch.list_namespaced_job(
            self.namespace, label_selector=f"{LABEL_SERIES}={resource_name(key)}").items

    def events(self, name: str) -> list:
        return [e for e in self.cluster.core.list_namespaced_event(self.namespace).items
                if e.involved_object.name == name]

    def reasons(self, name: str, expected: set[str] | str, timeout: float = 30.0) -> set[str]:
        """The reasons of the Events about `name`, once they include `expected` (the operator
        posts its Events on the side, after the step that says them)."""
        expected = {expected} if isinstance(expected, str) else expected
        return wait_until(lambda: (found := {e.reason for e in self.events(name)}) >= expected and found,
                          timeout, f"Events {sorted(expected)} about {name}")

    def wait_series_phase(self, key: SeriesKey, phases, timeout=120.0) -> dict:
        phases = (phases,) if isinstance(phases, str) else phases
        return wait_until(lambda: (s := self.series(key)) and (s.get("status") or {}).get("phase") in phases and s,
                          timeout, f"series phase {phases}\n--- operator log ---\n{self.operator_log()[-3000:]}")

    def stored(self) -> list[Path]:
        found = []
        for folder, _dirs, files in os.walk(self.storage_dir / "series"):
            found.extend(Path(folder) / f for f in files)
        return found

    def apply(self, manifest: dict):
        return self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest),
                                    check=False)


def fingerprint_manifest(name, emulator, pacs, model="toy", modality="^CT$", **server):
    return manifest(name, emulator.base_url, model, pacs, modality=modality, **server)


def key_of(files) -> SeriesKey:
    import pydicom

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesKey(ds.SeriesInstanceUID, ds.SOPClassUID)


