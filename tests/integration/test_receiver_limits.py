"""Hostile peers cannot lock scanners out or make the relay buffer what they announce (issue 11).

Every test runs `isdr run` as a process and talks to it over real sockets; the legitimate peer is
dcmtk's echoscu or storescu. Idle peers connect from other loopback addresses (127.0.0.0/8), as
port scanners and broken devices elsewhere on a hospital network would.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import echoscu, storescu
from tests.support.processes import wait_until
from tests.support.raw_dicom import (A_ASSOCIATE_RJ, associate_rq, closed_by_peer, connect,
                                     idle_association, memory_of, read_pdu)

MiB = 1024 * 1024


def open_idle_connections(port: int, count: int, per_address: int, network: str) -> list[socket.socket]:
    sockets = []
    for index in range(count):
        sockets.append(connect(port, source=f"{network}.{2 + index // per_address}"))
    return sockets


def open_idle_associations(port: int, count: int, per_address: int, network: str) -> list[socket.socket]:
    return [idle_association(port, source=f"{network}.{2 + index // per_address}", calling=f"IDLE{index}")
            for index in range(count)]


def still_open(sock: socket.socket) -> bool:
    return not closed_by_peer(sock, timeout=0.01)


def test_a_scanner_is_answered_while_300_connections_and_50_associations_sit_idle(relays, dcmtk):
    relay = relays().start()
    idle = open_idle_connections(relay.port, 300, per_address=30, network="127.0.2")
    idle += open_idle_associations(relay.port, 50, per_address=10, network="127.0.3")
    try:
        started = time.monotonic()
        result = echoscu(relay.port)
        elapsed = time.monotonic() - started
        print(f"C-ECHO answered in {elapsed:.3f}s with 300 idle connections and 50 idle associations open")
        assert result.returncode == 0, result.stdout
        assert all(still_open(sock) for sock in idle[-50:])  # the idle associations were not dropped
    finally:
        for sock in idle:
            sock.close()
    assert relay.alive()


def test_a_connection_that_never_requests_an_association_is_closed(relays):
    relay = relays(env={"SCP_REQUEST_TIMEOUT": "1"}).start()
    with connect(relay.port, source="127.0.4.2") as sock:
        assert closed_by_peer(sock, timeout=20)
    relay.wait_for_log(r"WARNING .*127\.0\.4\.2.*no association request")


def test_connections_over_the_per_address_limit_are_refused_and_other_addresses_still_served(relays, dcmtk):
    relay = relays(env={"SCP_MAX_CONNECTIONS_PER_ADDRESS": "4"}).start()
    idle = open_idle_connections(relay.port, 4, per_address=4, network="127.0.5")
    try:
        with connect(relay.port, source="127.0.5.2") as fifth:
            assert closed_by_peer(fifth, timeout=20)
        relay.wait_for_log(r"WARNING .*127\.0\.5\.2.*connections from this address")
        assert echoscu(relay.port).returncode == 0
    finally:
        for sock in idle:
            sock.close()


def test_an_association_that_goes_quiet_is_aborted_after_the_idle_timeout(relays):
    relay = relays(env={"SCP_IDLE_TIMEOUT": "1"}).start()
    with idle_association(relay.port, source="127.0.6.2", calling="QUIET") as sock:
        assert closed_by_peer(sock, timeout=20)
    relay.wait_for_log(r"WARNING .*QUIET.*127\.0\.6\.2.*idle")


def test_the_association_limit_is_a_setting_and_the_next_request_is_rejected_and_logged(relays, dcmtk):
    relay = relays(env={"SCP_MAX_ASSOCIATIONS": "3"}).start()
    idle = open_idle_associations(relay.port, 3, per_address=3, network="127.0.7")
    try:
        with connect(relay.port, source="127.0.7.9") as sock:
            sock.sendall(associate_rq(calling="FOURTH"))
            pdu_type, body = read_pdu(sock)
        assert pdu_type == A_ASSOCIATE_RJ
        assert body[1] == 2  # rejected-transient: the sender may try again later
        relay.wait_for_log(r"WARNING .*rejected association from FOURTH at 127\.0\.7\.9.*limit")
    finally:
        for sock in idle:
            sock.close()
    assert echoscu(relay.port).returncode == 0  # released capacity is usable again


def send_claim(sock: socket.socket, header: bytes, body_bytes: int) -> int:
    """Send `header` then up to `body_bytes` of body; returns how much the relay took before closing."""
    sent = 0
    chunk = b"\x00" * MiB
    try:
        sock.sendall(header)
        while sent < body_bytes:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


@pytest.mark.parametrize("when", ["before negotiation", "after negotiation"])
def test_a_pdu_claiming_4_gb_is_aborted_before_its_body_is_buffered(relays, when):
    relay = relays(env={"SCP_MAX_PDU": "16384"}).start()
    before = memory_of(relay.process.pid)
    if when == "before negotiation":
        sock = connect(relay.port, source="127.0.8.2")
        header = struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0)  # an A-ASSOCIATE-RQ of 4 GB
    else:
        sock = idle_association(relay.port, source="127.0.8.2", calling="GREEDY")
        header = struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0)  # a P-DATA-TF of 4 GB
    with sock:
        sent = send_claim(sock, header, 256 * MiB)
        assert closed_by_peer(sock, timeout=20)
    after = memory_of(relay.process.pid)
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"4 GB {when}: the relay took {sent // MiB} MiB of body, peak RSS grew {growth / MiB:.1f} MiB "
          f"(RSS now {after['VmRSS'] / MiB:.1f} MiB)")
    assert sent < 256 * MiB
    assert growth < 32 * MiB
    relay.wait_for_log(r"WARNING .*127\.0\.8\.2.*(longer than|exceeds)")
    assert relay.alive()


def test_a_scanner_keeps_storing_while_a_greedy_peer_is_cut_off(tmp_path, relays, dcmtk):
    relay = relays(env={"SCP_MAX_PDU": "16384", "POST_AFTER": "3600"}).start()
    with connect(relay.port, source="127.0.9.2") as sock:
        send_claim(sock, struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0), 8 * MiB)
    series = write_ct_series(tmp_path / "ct", count=3, rows=64, cols=64)
    result = storescu(relay.port, series)
    assert result.returncode == 0, result.stdout
    wait_until(lambda: len(relay.stored_instances()) == 3, what="3 stored")


def test_the_address_allow_list_rejects_other_addresses(relays, dcmtk):
    relay = relays(env={"SCP_ALLOWED_ADDRESSES": "127.0.0.1"}).start()
    with connect(relay.port, source="127.0.10.2") as sock:
        sock.sendall(associate_rq(calling="ELSEWHERE"))
        pdu_type, body = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_RJ and body[1] == 1  # rejected-permanent
    relay.wait_for_log(r"WARNING .*rejected association from ELSEWHERE at 127\.0\.10\.2: address not allowed")
    assert echoscu(relay.port).returncode == 0


def test_the_maximum_pdu_announced_is_the_setting_and_large_instances_arrive_in_such_pdus(tmp_path, relays, dcmtk):
    from pynetdicom import AE

    relay = relays(env={"SCP_MAX_PDU": "16384", "POST_AFTER": "3600"}).start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", relay.port, ae_title=relay.ae_title)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()
    series = write_ct_series(tmp_path / "ct", count=2, rows=256, cols=256)  # 128 KiB each: 8+ PDUs
    assert storescu(relay.port, series).returncode == 0
    wait_until(lambda: len(relay.stored_instances()) == 2, what="2 stored")
