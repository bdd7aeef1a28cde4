"""The chart installs, upgrades and (with crds.keep=false) deletes ISDR's CRDs, and takes over the
CRDs of a release made with the chart's crds/ folder (chart 0.1.0) as docs/kubernetes.md says.

These tests create and delete CustomResourceDefinitions, which the session's control plane shares
with every other test (its CRDs are pre-installed, as an administrator would apply them: the other
tests install the chart with crds.enabled=false). So they run on a control plane of their own,
started bare, without any CRD (about 8 s). On USE_EXISTING_CLUSTER they are skipped: deleting a
real cluster's CRDs would delete every Fingerprint in it.
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.support.kube import KubeError, local_cluster, use_existing_cluster, wait_until

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "isdr"
ISDR_CRDS = ("fingerprints.isdr.io", "dicomseries.isdr.io")
PEERING_CRD = "kopfpeerings.kopf.dev"
CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
FINGERPRINT = REPO / "examples" / "fingerprints" / "ct-thorax-oars.yaml"


@pytest.fixture(scope="module")
def bare_cluster(request):
    """A control plane of this module's own, with no CustomResourceDefinition installed."""
    if use_existing_cluster():
        pytest.skip("creates and deletes CustomResourceDefinitions: only on a control plane of the tests' own")
    work_dir = Path(tempfile.mkdtemp(prefix="isdr-kube-crds-"))
    yield from local_cluster(request, work_dir, crds=False)


@pytest.fixture
def cluster(bare_cluster):
    """The bare control plane, with ISDR's CRDs (and their objects) gone before each test."""
    for name in ISDR_CRDS:
        bare_cluster.rest.delete(f"{CRD_API}/{name}", ok_missing=True)
    wait_until(lambda: all(crd(bare_cluster, name) is None for name in ISDR_CRDS), 60, what="ISDR's CRDs gone")
    return bare_cluster


def crd(cluster, name: str) -> dict | None:
    return cluster.rest.get(f"{CRD_API}/{name}", ok_missing=True)


def install(cluster, release: str, namespace: str, *args: str, chart: Path = CHART, check: bool = True):
    return cluster.helm("install", release, str(chart), "-n", namespace, "--create-namespace", *args, check=check)


def upgrade(cluster, release: str, namespace: str, *args: str, chart: Path = CHART, check: bool = True):
    return cluster.helm("upgrade", release, str(chart), "-n", namespace, *args, check=check)


def apply_fingerprint(cluster, namespace: str, manifest: dict | None = None, check: bool = True):
    text = yaml.safe_dump(manifest) if manifest else FINGERPRINT.read_text()
    return cluster.kubectl("-n", namespace, "apply", "-f", "-", input=text, check=check)


def fingerprints(cluster, namespace: str) -> list[str]:
    try:
        listing = cluster.rest.get(f"/apis/isdr.io/v1alpha1/namespaces/{namespace}/fingerprints")
    except KubeError:
        return []
    return [item["metadata"]["name"] for item in listing["items"]]


def owner(cluster, name: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(managed-by label, release name, release namespace, resource policy) of a CRD."""
    meta = crd(cluster, name)["metadata"]
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    return (labels.get("app.kubernetes.io/managed-by"), annotations.get("meta.helm.sh/release-name"),
            annotations.get("meta.helm.sh/release-namespace"), annotations.get("helm.sh/resource-policy"))


def chart_copy(tmp_path: Path, name: str) -> Path:
    """The chart as a plain folder (links resolved, as `helm package` stores it), to change."""
    target = tmp_path / name / "isdr"
    shutil.copytree(CHART, target, symlinks=False)
    return target


def old_chart(tmp_path: Path) -> Path:
    """The chart as 0.1.0 shipped it: all three CRDs in crds/, which Helm installs once and never owns."""
    chart = chart_copy(tmp_path, "chart-0.1.0")
    for path in (chart / "files" / "crds").glob("*.yaml"):
        path.rename(chart / "crds" / path.name)
    (chart / "templates" / "crds.yaml").unlink()
    chart_yaml = chart / "Chart.yaml"
    chart_yaml.write_text(re.sub(r"^version: .*$", "version: 0.1.0", chart_yaml.read_text(), flags=re.M))
    return chart


def test_a_fresh_install_owns_isdrs_crds_and_uninstall_keeps_them_with_every_fingerprint(cluster):
    install(cluster, "first", "clinic-a")
    for name in ISDR_CRDS:
        cluster.wait_crd_established(name)
        assert owner(cluster, name) == ("Helm", "first", "clinic-a", "keep")
    peering = crd(cluster, PEERING_CRD)
    assert peering is not None, "kopf's CRD comes from the chart's crds/ folder"
    assert "meta.helm.sh/release-name" not in (peering["metadata"].get("annotations") or {}), "and nobody owns it"
    apply_fingerprint(cluster, "clinic-a")

    uninstalled = cluster.helm("uninstall", "first", "-n", "clinic-a")
    assert "kept due to the resource policy" in uninstalled.stdout + uninstalled.stderr
    assert all(crd(cluster, name) for name in ISDR_CRDS)
    assert fingerprints(cluster, "clinic-a") == ["ct-thorax-oars"]

    install(cluster, "first", "clinic-a")  # the same release again takes its CRDs back
    assert fingerprints(cluster, "clinic-a") == ["ct-thorax-oars"]
    cluster.helm("uninstall", "first", "-n", "clinic-a")


def test_helm_upgrade_brings_the_new_chart_s_crds(cluster, tmp_path):
    install(cluster, "isdr", "up")
    newer = chart_copy(tmp_path, "newer")
    # The newer chart's Fingerprint has a field the installed one does not know.
    crd_file = newer / "files" / "crds" / "fingerprint.yaml"
    document = yaml.safe_load(crd_file.read_text())
    spec = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["note"] = {"type": "string", "maxLength": 200, "description": "A note for people."}
    crd_file.write_text(yaml.safe_dump(document))
    with_note = yaml.safe_load(FINGERPRINT.read_text())
    with_note["spec"]["note"] = "thorax organs at risk, for the TPS"
    refused = apply_fingerprint(cluster, "up", with_note, check=False)
    assert refused.returncode != 0 and 'unknown field "spec.note"' in refused.stderr

    upgrade(cluster, "isdr", "up", "--reset-then-reuse-values", chart=newer)
    served = crd(cluster, "fingerprints.isdr.io")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert served["properties"]["spec"]["properties"]["note"]["maxLength"] == 200
    wait_until(lambda: apply_fingerprint(cluster, "up", with_note, check=False).returncode == 0, 30,
               what="the API server to accept spec.note")
    assert owner(cluster, "fingerprints.isdr.io") == ("Helm", "isdr", "up", "keep")
    cluster.helm("uninstall", "isdr", "-n", "up")


def test_with_crds_keep_false_uninstall_deletes_the_crds_and_their_objects(cluster):
    install(cluster, "gone", "short-lived")
    upgrade(cluster, "gone", "short-lived", "--reset-then-reuse-values", "--set", "crds.keep=false")
    assert owner(cluster, "fingerprints.isdr.io") == ("Helm", "gone", "short-lived", None)
    apply_fingerprint(cluster, "short-lived")
    cluster.helm("uninstall", "gone", "-n", "short-lived")
    wait_until(lambda: all(crd(cluster, name) is None for name in ISDR_CRDS), 60, what="the CRDs deleted")
    assert crd(cluster, PEERING_CRD) is not None, "kopf's CRD is never the release's to delete"


def test_turning_crds_enabled_off_keeps_them(cluster):
    install(cluster, "switch", "switch")
    upgrade(cluster, "switch", "switch", "--reset-then-reuse-values", "--set", "crds.enabled=false")
    assert all(crd(cluster, name) for name in ISDR_CRDS)
    cluster.helm("uninstall", "switch", "-n", "switch")
    assert all(crd(cluster, name) for name in ISDR_CRDS)


def test_a_second_release_leaves_the_crds_to_the_first(cluster):
    install(cluster, "isdr", "clinic-a")
    refused = install(cluster, "isdr", "clinic-b", check=False)
    assert refused.returncode != 0
    assert ("the CustomResourceDefinition fingerprints.isdr.io belongs to the release isdr in namespace "
            "clinic-a: one release manages ISDR's CRDs in a cluster, so install this one with "
            "--set crds.enabled=false") in refused.stderr
    assert "isdr" not in cluster.helm("list", "-n", "clinic-b", "-q").stdout.split(), "nothing was installed"
    install(cluster, "isdr", "clinic-b", "--set", "crds.enabled=false")
    assert owner(cluster, "fingerprints.isdr.io") == ("Helm", "isdr", "clinic-a", "keep")
    for namespace in ("clinic-b", "clinic-a"):
        cluster.helm("uninstall", "isdr", "-n", namespace)


def documented_takeover_commands() -> list[list[str]]:
    """The commands docs/kubernetes.md gives for taking over CRDs a 0.1.0 release installed."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    section = text[text.index("### Upgrading from chart 0.1.0"):]
    block = section.split("```")[3]  # the second code block: the commands
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["kubectl", "label"], ["kubectl", "annotate"], ["helm", "upgrade"]]
    return commands


def test_a_release_of_chart_0_1_0_takes_its_crds_over_as_documented(cluster, tmp_path):
    for name in ISDR_CRDS + (PEERING_CRD,):
        cluster.rest.delete(f"{CRD_API}/{name}", ok_missing=True)
    wait_until(lambda: crd(cluster, PEERING_CRD) is None, 60, what="kopf's CRD gone too")
    install(cluster, "isdr", "isdr", chart=old_chart(tmp_path))
    assert owner(cluster, "fingerprints.isdr.io") == (None, None, None, None), "crds/ gives Helm no ownership"
    apply_fingerprint(cluster, "isdr")

    refused = upgrade(cluster, "isdr", "isdr", "--reset-then-reuse-values", check=False)
    assert refused.returncode != 0
    assert "exists but no Helm release manages it" in refused.stderr
    assert ("`kubectl label crd fingerprints.isdr.io dicomseries.isdr.io app.kubernetes.io/managed-by=Helm "
            "--overwrite`") in refused.stderr
    history = cluster.helm("history", "isdr", "-n", "isdr").stdout
    assert "failed" not in history, "nothing was changed: the release stays deployed"

    for command in documented_takeover_commands():
        tool, args = command[0], command[1:]
        if tool == "helm":
            args = [str(CHART) if a == "charts/isdr" else a for a in args]
        (cluster.kubectl if tool == "kubectl" else cluster.helm)(*args)
    for name in ISDR_CRDS:
        assert owner(cluster, name) == ("Helm", "isdr", "isdr", "keep")
    assert fingerprints(cluster, "isdr") == ["ct-thorax-oars"], "every Fingerprint stays"
    peering = crd(cluster, PEERING_CRD)
    assert "meta.helm.sh/release-name" not in (peering["metadata"].get("annotations") or {})
    cluster.helm("uninstall", "isdr", "-n", "isdr")
    assert all(crd(cluster, name) for name in ISDR_CRDS)
