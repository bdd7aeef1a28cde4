"""`isdr fingerprint test --cluster`: the dry run against the Fingerprints of a real API server,
as the operator sees them (only a Ready one is used)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from isdr_devtools.synthetic import write_ct_series
from relay.kube.resources import FINGERPRINT_PLURAL, GROUP, VERSION

pytestmark = pytest.mark.kube


def fingerprint(name, modality):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Fingerprint", "metadata": {"name": name},
            "spec": {"match": {"modality": modality}, "inferenceServer": {"url": "http://is:8000", "model": "m"},
                     "destinations": [{"host": "pacs", "port": 104, "aeTitle": "PACS"}]}}


def test_cluster_fingerprints_are_tested_and_one_not_ready_is_never_a_match(tmp_path, kube_cluster, kube_namespace):
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{kube_namespace}/{FINGERPRINT_PLURAL}"
    for name in ("ct-ready", "ct-pending", "mr-ready"):
        kube_cluster.rest.post(path, fingerprint(name, "^MR$" if name.startswith("mr") else "^CT$"))
    for name in ("ct-ready", "mr-ready"):  # what the operator writes once it found them usable
        kube_cluster.rest.patch(f"{path}/{name}/status", {"status": {"conditions": [
            {"type": "Ready", "status": "True", "reason": "Valid", "message": "ok",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, kind="merge")
    write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)

    result = subprocess.run([sys.executable, "-m", "relay.cli", "fingerprint", "test", str(tmp_path / "ct"),
                             "--cluster", "--namespace", kube_namespace, "--kubeconfig", str(kube_cluster.kubeconfig)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"against 3 Fingerprints in namespace {kube_namespace}" in out
    assert "match     ct-ready" in out
    assert "no match  ct-pending  would match, but is not looked at by the operator yet" in out
    assert "no match  mr-ready    modality '^MR$' is not found in 'CT'" in out
