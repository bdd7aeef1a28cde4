"""The node agent's pod network rules (tests/support/pod_network.py): how a pod's declared ports
move to host ports, and what a pod's /etc/hosts says."""

from __future__ import annotations

import socket
from itertools import count

from tests.support.pod_network import PodPorts, ServiceProxy, hosts_file_text

RECEIVER = {"name": "receiver", "ports": [{"name": "dicom", "containerPort": 11112},
                                          {"name": "health", "containerPort": 8080},
                                          {"name": "metrics", "containerPort": 9120, "protocol": "TCP"},
                                          {"name": "syslog", "containerPort": 514, "protocol": "UDP"}]}


def ports(*containers) -> PodPorts:
    return PodPorts(containers, allocate=count(40001).__next__)


def test_each_declared_tcp_port_gets_a_host_port_of_its_own():
    mapping = ports(RECEIVER)
    assert mapping.host_ports == {11112: 40001, 8080: 40002, 9120: 40003}
    assert mapping.host_port("dicom") == mapping.host_port(11112) == 40001
    assert mapping.host_port("health", RECEIVER) == 40002
    assert mapping.host_port("syslog") is None, "UDP is not forwarded"
    assert mapping.host_port(7000) == 7000, "an undeclared port stays where the program puts it"


def test_a_port_is_rewritten_where_it_stands_alone_the_whole_value_or_after_a_colon_or_equals_sign():
    mapping = ports(RECEIVER)
    assert mapping.rewrite("11112") == "40001"
    assert mapping.rewrite("--liveness=http://0.0.0.0:8080/healthz") == "--liveness=http://0.0.0.0:40002/healthz"
    assert mapping.rewrite("--port=9120") == "--port=40003"
    assert mapping.rewrite("localhost:11112") == "localhost:40001"
    for untouched in ("111120", "911120", "/data/8080/x", "8080-tls", '{"fsGroup": 10001}', "v9120", "2Gi"):
        assert mapping.rewrite(untouched) == untouched


def test_the_ports_of_every_container_are_the_pods():
    sidecar = {"name": "proxy", "ports": [{"name": "web", "containerPort": 8443}]}
    mapping = ports(RECEIVER, sidecar)
    assert mapping.rewrite("https://localhost:8443 -> localhost:11112") == "https://localhost:40004 -> localhost:40001"
    assert mapping.host_port("web") == 40004
    assert mapping.host_port("web", RECEIVER) is None, "a probe's named port is its container's"


def test_the_mapping_survives_a_round_trip_through_its_file(tmp_path):
    mapping = ports(RECEIVER)
    mapping.save(tmp_path / "ports.json")
    loaded = PodPorts.load(tmp_path / "ports.json")
    assert loaded.host_ports == mapping.host_ports and loaded.host_port("metrics") == 40003
    assert loaded.rewrite("SCP_PORT=11112") == "SCP_PORT=40001"


def test_the_pods_hosts_file_names_services_as_the_cluster_dns_and_search_domains_would():
    text = hosts_file_text("clinic", "isdr-receiver-7d9f", [{"ip": "10.1.2.3", "hostnames": ["pacs.local"]}],
                           {("clinic", "isdr-receiver"): "127.70.1.2", ("storage", "minio"): "127.80.3.4"})
    lines = text.splitlines()
    assert "127.0.0.1\tisdr-receiver-7d9f" in lines
    assert "10.1.2.3\tpacs.local" in lines
    assert ("127.70.1.2\tisdr-receiver.clinic.svc.cluster.local isdr-receiver.clinic.svc isdr-receiver.clinic "
            "isdr-receiver") in lines
    assert "127.80.3.4\tminio.storage.svc.cluster.local minio.storage.svc minio.storage" in lines, \
        "another namespace's Service has no short name"


def test_a_service_whose_port_is_taken_on_every_address_spares_the_other_services(tmp_path):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))  # another program listening on all addresses, as a relay's metrics port would
    taken.listen()
    busy_port = taken.getsockname()[1]
    proxy = ServiceProxy(lambda _ns, _selector, _not_ready: [], tmp_path / "services.json")

    def service(uid: str, name: str, port: int) -> dict:
        return {"metadata": {"uid": uid, "namespace": "ns", "name": name},
                "spec": {"selector": {"app": name}, "ports": [{"port": port}]}}

    try:
        proxy.handle("ADDED", service("a", "metrics", busy_port))
        proxy.handle("ADDED", service("b", "receiver", 0))
        assert set(proxy.addresses()) == {("ns", "receiver")}
    finally:
        proxy.stop()
        taken.close()
