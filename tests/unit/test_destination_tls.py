"""DICOM TLS per destination (issue 11): the Fingerprint fields, how `isdr run` and Kubernetes
Jobs find the files, and what the operator reports. Delivery itself is tested against dcmtk's
`storescp +tls` in tests/integration/test_delivery.py and test_relay_delivery_tls.py."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from isdr_operator.fingerprints import evaluate
from isdr_operator.jobs import build_job
from isdr_operator.settings import JobSettings
from relay.fingerprints.loader import load_fingerprint_file
from relay.fingerprints.manifest import (
    FingerprintError,
    fingerprint_from_manifest,
    fingerprint_from_seed,
    fingerprint_to_manifest,
)
from relay.fingerprints.model import CABundleRef, DestinationTLS
from relay.kube.job_command import with_mounted_destination_tls
from relay.lifecycle import TaskState
from relay.uids import SeriesKey

PLAIN = {"host": "pacs", "port": 104, "aeTitle": "PACS"}


def body(*destinations) -> dict:
    return {
        "apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint",
        "metadata": {"name": "ct", "namespace": "isdr", "generation": 1},
        "spec": {"match": {"modality": "CT"},
                 "inferenceServer": {"url": "https://is.example", "model": "m"},
                 "destinations": list(destinations) or [PLAIN]},
    }


def secure(**tls) -> dict:
    return {"host": "10.0.0.12", "port": 2762, "aeTitle": "SECURE", "tls": {"enabled": True, **tls}}


KUBE_TLS = secure(caBundle={"secretKeyRef": {"name": "pacs-ca", "key": "ca.crt"}},
                  clientCertificate={"secretName": "isdr-client"}, serverName="pacs.example.org")


def test_a_destination_without_tls_is_plain_dicom():
    (destination,) = fingerprint_from_manifest(body(PLAIN), "x").destinations
    assert destination.tls is None


def test_tls_enabled_false_is_plain_dicom_whatever_else_is_set():
    off = secure(caBundle={"path": "ca.pem"})
    off["tls"]["enabled"] = False
    (destination,) = fingerprint_from_manifest(body(off), "x").destinations
    assert destination.tls is None


def test_every_tls_field_is_read():
    (destination,) = fingerprint_from_manifest(body(KUBE_TLS), "x").destinations
    assert destination.tls == DestinationTLS(ca_bundle_ref=CABundleRef("secret", "pacs-ca", "ca.crt"),
                                             client_secret="isdr-client", server_name="pacs.example.org")


def test_tls_with_only_enabled_verifies_against_the_systems_cas():
    (destination,) = fingerprint_from_manifest(body(secure()), "x").destinations
    assert destination.tls == DestinationTLS()


@pytest.mark.parametrize("destination", [
    KUBE_TLS,
    secure(caBundle={"configMapKeyRef": {"name": "cas", "key": "pacs.pem"}}),
    secure(caBundle={"path": "ca.pem"}, clientCertificate={"certificatePath": "c.pem", "keyPath": "c.key"}),
    secure(),
])
def test_tls_settings_survive_a_round_trip_through_the_manifest(destination):
    fp = fingerprint_from_manifest(body(destination), "x")
    assert fingerprint_from_manifest(fingerprint_to_manifest(fp), "x") == fp
    assert fingerprint_to_manifest(fp)["spec"]["destinations"][0] == destination


@pytest.mark.parametrize("tls, message", [
    ({"caBundle": {"path": "a.pem", "secretKeyRef": {"name": "s", "key": "k"}}},
     "give exactly one of configMapKeyRef, secretKeyRef or path"),
    ({"clientCertificate": {"certificatePath": "c.pem"}}, "give either secretName, or both certificatePath and keyPath"),
    ({"clientCertificate": {"secretName": "s", "keyPath": "c.key"}},
     "give either secretName, or both certificatePath and keyPath"),
    ({"serverName": "has space"}, "is not valid"),
    ({"verify": False}, "unknown field"),
])
def test_invalid_tls_settings_are_refused_with_the_field(tls, message):
    with pytest.raises(FingerprintError) as refused:
        fingerprint_from_manifest(body(secure(**tls)), "x")
    assert "spec.destinations[0].tls" in str(refused.value) and message in str(refused.value)


def test_seed_files_have_no_tls():
    seed = {"modality_regex": "CT", "sop_class_uid_regex": "", "series_description_regex": "",
            "study_description_regex": "", "exclude_regex": "a^", "inference_server_url": "http://is/api/tasks/",
            "model_human_readable_id": "m", "scus": [{"scu_ip": "pacs", "scu_port": "104", "scu_ae_title": "PACS"}]}
    fp, _ = fingerprint_from_seed(seed, "seed", "seed.json")
    assert [d.tls for d in fp.destinations] == [None]


# --- isdr run: files next to the manifest ------------------------------------------------------


def write_manifest(folder, *destinations):
    path = folder / "ct.yaml"
    path.write_text(yaml.safe_dump(body(*destinations), sort_keys=False))
    return path


def test_isdr_run_resolves_tls_files_relative_to_the_manifest(tmp_path):
    for name in ("ca.pem", "client.crt", "client.key"):
        (tmp_path / name).write_text("pem")
    path = write_manifest(tmp_path, PLAIN, secure(caBundle={"path": "ca.pem"}, clientCertificate={
        "certificatePath": "client.crt", "keyPath": "client.key"}))

    result = load_fingerprint_file(path)

    assert result.problems == ()
    tls = result.fingerprints[0].destinations[1].tls
    assert (tls.ca_bundle, tls.client_certificate, tls.client_key) == (
        str(tmp_path / "ca.pem"), str(tmp_path / "client.crt"), str(tmp_path / "client.key"))


def test_isdr_run_reports_missing_tls_files_and_kubernetes_references_where_they_are_written(tmp_path):
    (tmp_path / "ca.pem").write_text("pem")
    path = write_manifest(tmp_path, secure(caBundle={"path": "ca.pem"}, clientCertificate={
        "certificatePath": "gone.crt", "keyPath": "gone.key"}), KUBE_TLS)

    result = load_fingerprint_file(path)

    assert result.fingerprints == ()
    messages = [problem.message for problem in result.problems]
    assert messages == [
        f"spec.destinations[0].tls.clientCertificate.certificatePath: the certificate file "
        f"{str(tmp_path / 'gone.crt')!r} does not exist",
        f"spec.destinations[0].tls.clientCertificate.keyPath: the private key file "
        f"{str(tmp_path / 'gone.key')!r} does not exist",
        "spec.destinations[1].tls.caBundle: a secret reference only works on Kubernetes; outside a cluster "
        "give the PEM file as caBundle.path",
        "spec.destinations[1].tls.clientCertificate.secretName: a Secret only works on Kubernetes; outside a "
        "cluster give clientCertificate.certificatePath and keyPath",
    ]
    assert all(problem.line for problem in result.problems)


# --- Kubernetes: the operator and the Job ------------------------------------------------------


def no_problem(kind, name, key):
    return None


def test_a_fingerprint_whose_destination_tls_files_resolve_is_ready():
    assert evaluate(body(PLAIN, KUBE_TLS), no_problem).ready


def test_missing_destination_tls_secrets_make_the_fingerprint_not_ready():
    missing = evaluate(body(PLAIN, KUBE_TLS),
                       lambda kind, name, key: f"{kind} {name} has no key {key!r}" if key == "tls.key" else None)
    assert (missing.ready, missing.reason) == (False, "DestinationTLSNotFound")
    assert missing.message == "spec.destinations[1].tls: Secret isdr-client has no key 'tls.key'"


def test_destination_tls_files_on_the_relays_machine_are_not_usable_on_kubernetes():
    evaluation = evaluate(body(secure(caBundle={"path": "/etc/ca.pem"})), no_problem)
    assert (evaluation.ready, evaluation.reason) == (False, "UnsupportedDestinationTLS")


def job_for(fingerprint_body):
    task = TaskState(task_id="ct-abc-1", fingerprint="ct", generation=1)
    return build_job(task=task, key=SeriesKey("1.2.3", "1.2.840.10008.5.1.4.1.1.2"), series_name="series-abc",
                     fingerprint_body=fingerprint_body, settings=JobSettings(), relay_get_timeout=60)


def test_the_job_mounts_each_destinations_tls_secrets_where_isdr_job_finds_them():
    config_map_ca = secure(caBundle={"configMapKeyRef": {"name": "cas", "key": "pacs.pem"}})
    spec = job_for(body(PLAIN, KUBE_TLS, secure(), config_map_ca))
    pod = spec["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"] if v["name"].startswith("destination-")}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"] if m["name"].startswith("destination-")}

    assert sorted(volumes) == sorted(mounts) == ["destination-1-tls", "destination-3-tls"]  # only references
    assert volumes["destination-1-tls"]["projected"]["sources"] == [
        {"secret": {"name": "pacs-ca", "items": [{"key": "ca.crt", "path": "ca.pem"}]}},
        {"secret": {"name": "isdr-client", "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                     {"key": "tls.key", "path": "tls.key"}]}},
    ]
    assert volumes["destination-3-tls"]["projected"]["sources"] == [
        {"configMap": {"name": "cas", "items": [{"key": "pacs.pem", "path": "ca.pem"}]}}]
    assert mounts["destination-1-tls"] == {"name": "destination-1-tls", "mountPath": "/etc/isdr/destination-tls/1",
                                           "readOnly": True}

    # `isdr job` reads the fingerprint from the Job and points the destinations at the mounts.
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["ISDR_DESTINATION_TLS_DIR_1"] == "/etc/isdr/destination-tls/1"
    fingerprint = with_mounted_destination_tls(fingerprint_from_manifest(json.loads(env["ISDR_FINGERPRINT"]), "job"),
                                               env)
    tls = fingerprint.destinations[1].tls
    assert (tls.ca_bundle, tls.client_certificate, tls.client_key, tls.server_name) == (
        "/etc/isdr/destination-tls/1/ca.pem", "/etc/isdr/destination-tls/1/tls.crt",
        "/etc/isdr/destination-tls/1/tls.key", "pacs.example.org")
    assert fingerprint.destinations[2].tls == DestinationTLS()  # the system's CAs
    assert fingerprint.destinations[3].tls.ca_bundle == "/etc/isdr/destination-tls/3/ca.pem"
    assert fingerprint.destinations[0].tls is None


def test_a_fingerprint_without_destination_tls_adds_no_volume():
    before = job_for(body(PLAIN))
    assert not [v for v in before["spec"]["template"]["spec"]["volumes"] if v["name"].startswith("destination-")]
    assert copy.deepcopy(before) == job_for(body(PLAIN))
