"""DICOM TLS on the receiving side (issue 11), with dcmtk's storescu and echoscu as real peers."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import echoscu
from tests.support.processes import dcmtk_env, free_port, require_dcmtk, wait_until
from tests.support.raw_dicom import associate_rq, closed_by_peer, connect
from tests.support.certificates import CertificateAuthority


@pytest.fixture
def pki(tmp_path):
    hospital = CertificateAuthority(tmp_path / "pki", "Hospital DICOM CA")
    stranger = CertificateAuthority(tmp_path / "pki-other", "Someone else's CA")
    return {
        "ca": hospital.certificate,
        "server": hospital.issue("isdr.relay.test", server=True),
        "scanner": hospital.issue("CT scanner 3", client=True),
        "intruder": stranger.issue("CT scanner 3", client=True),
    }


def tls_relay(relays, pki, mutual=True, only=False):
    env = {
        "SCP_TLS_PORT": str(free_port()),
        "SCP_TLS_CERT_FILE": str(pki["server"].certificate),
        "SCP_TLS_KEY_FILE": str(pki["server"].key),
        "POST_AFTER": "3600",  # no fingerprint: keep what was stored until the test looked
    }
    if mutual:
        env["SCP_TLS_CA_FILE"] = str(pki["ca"])
    if only:
        env["SCP_TLS_ONLY"] = "true"
    relay = relays(env=env)
    relay.tls_port = int(env["SCP_TLS_PORT"])
    if only:
        relay.port = relay.tls_port  # the port the test waits on
    return relay.start()


def dcmtk_tls(program: str, port: int, pki, client: str | None, *extra) -> subprocess.CompletedProcess:
    binary = require_dcmtk(program)
    identity = ["+tls", str(pki[client].key), str(pki[client].certificate)] if client else ["+tla"]
    args = [binary, "-aet", "SCANNER", "-aec", "ISDR", *identity, "+cf", str(pki["ca"]), "127.0.0.1", str(port),
            *extra]
    return subprocess.run(args, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)


def test_storescu_over_mutual_tls_stores_and_the_client_subject_is_logged(tmp_path, relays, pki, dcmtk):
    relay = tls_relay(relays, pki)
    series = write_ct_series(tmp_path / "ct", count=3, rows=64, cols=64)

    result = dcmtk_tls("storescu", relay.tls_port, pki, "scanner", *map(str, series))

    assert result.returncode == 0, result.stdout
    wait_until(lambda: len(relay.stored_instances()) == 3, what="3 stored over TLS")
    relay.wait_for_log(r"INFO .*TLS .*SCANNER.*127\.0\.0\.1.*CN=CT scanner 3")


def test_echoscu_over_tls_is_answered_and_the_plain_port_still_serves(relays, pki, dcmtk):
    relay = tls_relay(relays, pki)
    assert dcmtk_tls("echoscu", relay.tls_port, pki, "scanner").returncode == 0
    assert echoscu(relay.port).returncode == 0


@pytest.mark.parametrize("client", ["intruder", None], ids=["certificate from another CA", "no certificate"])
def test_a_client_certificate_that_does_not_verify_is_refused_and_logged(tmp_path, relays, pki, dcmtk, client):
    relay = tls_relay(relays, pki)
    series = write_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)

    result = dcmtk_tls("storescu", relay.tls_port, pki, client, *map(str, series))

    assert result.returncode != 0
    relay.wait_for_log(r"WARNING .*TLS handshake with 127\.0\.0\.1 failed.*certificate")
    assert relay.stored_instances() == []
    assert dcmtk_tls("echoscu", relay.tls_port, pki, "scanner").returncode == 0  # others still served


def test_server_only_tls_accepts_anonymous_clients(relays, pki, dcmtk):
    relay = tls_relay(relays, pki, mutual=False)
    assert dcmtk_tls("echoscu", relay.tls_port, pki, None).returncode == 0


def test_tls_only_listens_on_the_tls_port_alone(relays, pki, dcmtk):
    relay = tls_relay(relays, pki, only=True)
    assert dcmtk_tls("echoscu", relay.tls_port, pki, "scanner").returncode == 0
    plain_port = int(relay.env["SCP_PORT"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", plain_port), timeout=2).close()


def test_a_plain_association_on_the_tls_port_is_logged_with_a_hint(relays, pki):
    relay = tls_relay(relays, pki)
    with connect(relay.tls_port) as sock:
        sock.sendall(associate_rq())
        assert closed_by_peer(sock, timeout=20)
    relay.wait_for_log(r"WARNING .*plain DICOM .*TLS port.*\+tls")


def test_a_tls_handshake_on_the_plain_port_is_logged_with_a_hint(relays, pki):
    relay = tls_relay(relays, pki)
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    with connect(relay.port) as sock:
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(sock, server_hostname="localhost").close()
    relay.wait_for_log(rf"WARNING .*TLS handshake on the plain DICOM port.*{relay.tls_port}")
