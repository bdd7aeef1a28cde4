"""A private CA and a server certificate for the emulator's HTTPS, generated on first use.

The real InferenceServer normally sits behind a hospital's private CA, and the relay must verify
against the operator's bundle (CERT_FILE). The emulator therefore makes its own CA so tests can
check both sides: verification against DIR/ca.pem succeeds, without it it fails.

Files in the TLS directory: ca.pem, ca-key.pem, server.pem, server-key.pem. Existing files are
reused, so a restarted emulator keeps the CA its clients already trust; the server certificate is
re-issued (by the same CA) when it lacks a requested name or is about to expire.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
_CA_DAYS = 3650
_SERVER_DAYS = 825
_RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"


def _atomic_write(path: Path, data: bytes, private: bool) -> None:
    """Write via a temporary file and rename, so a reader never sees half a PEM file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if private:
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop duplicates
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _new_ca(files: TlsFiles) -> None:
    # EC P-256: generated in milliseconds (RSA would slow every test start) and accepted by
    # OpenSSL, requests and Java clients alike.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ISDR emulator test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _atomic_write(files.ca_key, _key_pem(key), private=True)
    _atomic_write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _new_server_cert(files: TlsFiles, names: list[str]) -> None:
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Strict verifiers (Python 3.13's VERIFY_X509_STRICT) want the authority key identifier.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # Key first: a reader that finds the new certificate also finds its key.
    _atomic_write(files.server_key, _key_pem(key), private=True)
    _atomic_write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _server_cert_is_usable(files: TlsFiles, names: list[str]) -> bool:
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    if cert.issuer != ca_cert.subject:
        return False
    if cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < _RENEW_BEFORE:
        return False
    present = {str(general_name.value) for general_name in san}
    return all(str(wanted.value) in present for wanted in _general_names(names))


def ensure_tls_files(directory: str | Path, extra_names: Iterable[str] = ()) -> TlsFiles:
    """Create (or reuse) the CA and a server certificate valid for localhost plus `extra_names`."""
    files = TlsFiles(Path(directory))
    files.directory.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*DEFAULT_NAMES, *(n for n in extra_names if n)]))
    if not (files.ca_cert.exists() and files.ca_key.exists()):
        _new_ca(files)
        # A new CA invalidates any server certificate left over from an old one.
        for stale in (files.server_cert, files.server_key):
            stale.unlink(missing_ok=True)
    if not _server_cert_is_usable(files, names):
        _new_server_cert(files, names)
    return files


def server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.server_cert), str(files.server_key))
    return context
