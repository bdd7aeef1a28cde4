"""`isdr run` delivering over DICOM TLS (issue 11), to dcmtk's `storescp +tls` as the destination.

The destination's TLS settings come from the Fingerprint manifest (spec.destinations[].tls), with
file paths relative to the manifest, as an administrator would write them.
"""

from __future__ import annotations

import shutil

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.integration.test_relay_end_to_end import assert_rtstruct_for, send
from tests.support.certificates import CertificateAuthority
from tests.support.fingerprints import manifest


@pytest.fixture
def pki(tmp_path):
    pacs_ca = CertificateAuthority(tmp_path / "pki" / "pacs-ca", "PACS CA")
    client_ca = CertificateAuthority(tmp_path / "pki" / "client-ca", "ISDR client CA")
    return {"pacs_ca": pacs_ca, "pacs": pacs_ca.issue("pacs", server=True),
            "client_ca": client_ca, "client": client_ca.issue("isdr", client=True),
            "stranger_ca": CertificateAuthority(tmp_path / "pki" / "stranger-ca", "Someone else's CA")}


@pytest.fixture
def secure_pacs(storescps, pki):
    """A TLS-only destination that requires a client certificate from the ISDR client CA."""
    return storescps("SECURE", tls=(pki["pacs"].certificate, pki["pacs"].key),
                     client_cas=[pki["client_ca"].certificate])


def tls_manifest(relay, emulator, scp, tls: dict) -> None:
    fingerprint = manifest("ct", emulator.base_url, "toy", scp)
    fingerprint["spec"]["destinations"][0]["tls"] = tls
    relay.add_manifest(fingerprint)


def copy_into(folder, *paths) -> list[str]:
    """Copies next to the manifest, named by a relative path as an administrator would."""
    names = []
    for path in paths:
        shutil.copyfile(path, folder / path.name)
        names.append(path.name)
    return names


def test_predictions_are_delivered_over_mutual_tls(tmp_path, emulator, relays, pki, secure_pacs):
    relay = relays()
    ca, certificate, key = copy_into(relay.fingerprint_dir, pki["pacs_ca"].certificate, pki["client"].certificate,
                                     pki["client"].key)
    tls_manifest(relay, emulator, secure_pacs, {"enabled": True, "caBundle": {"path": ca},
                                                "clientCertificate": {"certificatePath": certificate,
                                                                      "keyPath": key}})
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)

    send(relay, series)

    assert_rtstruct_for(secure_pacs.wait_for_files(1), series)
    relay.wait_for_log(r"task succeeded")


def relay_sending_over_tls(tmp_path, relays, emulator, scp, ca, delivery_timeout: int):
    """`isdr run` whose fingerprint reaches `scp` over TLS verified against `ca` (no client
    certificate), with a series sent to it."""
    relay = relays(env={"DELIVERY_TIMEOUT": str(delivery_timeout)})
    (ca_name,) = copy_into(relay.fingerprint_dir, ca)
    tls_manifest(relay, emulator, scp, {"enabled": True, "caBundle": {"path": ca_name}})
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
    return relay


def test_a_destination_whose_certificate_does_not_verify_is_retried_then_fails_with_the_reason(
        tmp_path, emulator, relays, pki, secure_pacs):
    relay = relay_sending_over_tls(tmp_path, relays, emulator, secure_pacs, pki["stranger_ca"].certificate, 4)

    reason = (r"SECURE@127\.0\.0\.1:\d+: TLS handshake failed: the destination's certificate does not verify "
              r"against \S+ca\.pem: unable to get local issuer certificate")
    relay.wait_for_log(reason + r"; retrying in \d+s")
    relay.wait_for_log(r"ERROR +relay\.pipeline: delivery failed for good: " + reason + r"; gave up after 4s")
    relay.wait_for_log(r"task failed")
    assert secure_pacs.files() == [] and relay.alive()


def test_a_destination_requiring_a_client_certificate_refuses_a_relay_without_one(
        tmp_path, emulator, relays, pki, secure_pacs):
    relay = relay_sending_over_tls(tmp_path, relays, emulator, secure_pacs, pki["pacs_ca"].certificate, 3)

    relay.wait_for_log(r"SECURE@127\.0\.0\.1:\d+ did not accept an association over TLS \(if it requires a "
                       r"client certificate, set tls\.clientCertificate\); retrying in")
    relay.wait_for_log(r"ERROR +relay\.pipeline: delivery failed for good: SECURE")
    assert secure_pacs.files() == []
