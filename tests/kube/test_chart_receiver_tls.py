"""The chart's receiver TLS values (receiver.tls): rendered with the pinned helm, no cluster."""

from __future__ import annotations

from relay.config import ENV_VARIABLES
from tests.kube.test_chart import CHART, container, env_of, one, render, run_helm

TLS = ("receiver.tls.enabled=true", "receiver.tls.secretName=dicom-tls")


def test_tls_is_off_by_default():
    c = container(one(render(), "Deployment", "isdr-receiver"))
    assert not any(name.startswith("SCP_TLS") for name in env_of(c))
    assert "dicom-tls" not in [p["name"] for p in c["ports"]]


def test_tls_adds_a_port_the_secret_and_the_settings_next_to_the_plain_port():
    docs = render(*TLS, "receiver.tls.verifyClients=true")
    deployment = one(docs, "Deployment", "isdr-receiver")
    c = container(deployment)
    env = {name: item["value"] for name, item in env_of(c).items() if name.startswith("SCP_TLS")}
    assert env == {"SCP_TLS_PORT": "2762", "SCP_TLS_CERT_FILE": "/etc/isdr/receiver-tls/tls.crt",
                   "SCP_TLS_KEY_FILE": "/etc/isdr/receiver-tls/tls.key", "SCP_TLS_ONLY": "false",
                   "SCP_TLS_CA_FILE": "/etc/isdr/receiver-tls/ca.crt"}
    assert set(env) <= set(ENV_VARIABLES)  # names the relay reads
    assert {"name": "dicom-tls", "containerPort": 2762, "protocol": "TCP"} in c["ports"]
    assert {"name": "receiver-tls", "mountPath": "/etc/isdr/receiver-tls", "readOnly": True} in c["volumeMounts"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["receiver-tls"]["secret"] == {"secretName": "dicom-tls"}
    ports = {p["name"]: p["port"] for p in one(docs, "Service", "isdr-receiver")["spec"]["ports"]}
    assert ports == {"dicom": 11112, "dicom-tls": 2762}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "dicom"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_tls_only_serves_and_probes_the_tls_port_alone():
    docs = render(*TLS, "receiver.tls.only=true")
    c = container(one(docs, "Deployment", "isdr-receiver"))
    assert env_of(c)["SCP_TLS_ONLY"]["value"] == "true" and "SCP_TLS_CA_FILE" not in env_of(c)
    assert c["livenessProbe"]["tcpSocket"] == {"port": "dicom-tls"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}, "readiness is /readyz either way"
    assert [p["name"] for p in one(docs, "Service", "isdr-receiver")["spec"]["ports"]] == ["dicom-tls"]


def test_tls_without_a_secret_is_refused():
    result = run_helm("template", "isdr", str(CHART), "--set", "receiver.tls.enabled=true", check=False)
    assert result.returncode != 0 and "receiver.tls.secretName is required" in result.stderr
