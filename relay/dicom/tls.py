"""DICOM TLS for the receiver (PS3.15 B.9, BCP 195): the server's SSL context and who the peer is."""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str, ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2 or later with Python's (OpenSSL's) secure defaults; with `ca_file`, a client
    certificate signed by that CA is required (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca_file)
    return context


def peer_subject(sock: ssl.SSLSocket) -> str | None:
    """The verified client certificate's subject as 'O=...,CN=...' (None without one)."""
    certificate = sock.getpeercert()
    if not certificate:
        return None
    parts = []
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            parts.append(f"{_SHORT_NAMES.get(name, name)}={value}")
    return ",".join(parts)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}
