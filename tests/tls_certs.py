"""A throwaway PKI for TLS tests (importable as `tls_certs`, beside `testkit`): a CA, a
node ("server") certificate for loopback (127.0.0.1, ::1, localhost) and a client
certificate, all signed by that CA, written as PEM files with the `cryptography` package.
The node certificate may serve and connect (serverAuth + clientAuth), as a cluster node's
must under mutual TLS: its prefill worker presents it to the decode workers."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PKI:
    ca: str  # PEM paths
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(subject: str, key, ca_key, issuer: x509.Name, *, ca: bool = False,
           sans: list | None = None, usage=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> PKI:
    """Write ca.pem, server.pem/server.key and client.pem/client.key into `directory`."""
    d = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("pdserve test CA", ca_key, ca_key, _name("pdserve test CA"), ca=True)
    files = {"ca": d / "ca.pem"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    node = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    for role, usage, names in (("server", node, sans),
                               ("client", (ExtendedKeyUsageOID.CLIENT_AUTH,), None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(f"pdserve test {role}", key, ca_key, ca_cert.subject, sans=names,
                      usage=usage)
        (d / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{role}.key", key)
    return PKI(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"),
                   str(d / "client.pem"), str(d / "client.key"))
