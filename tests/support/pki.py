"""A throwaway certificate authority for tests: a root, and leaf certificates it signs.

Leaves carry SPIFFE URIs and DNS names as subject alternative names, as
Istio's workload certificates do. Everything is PEM bytes; nothing is kept.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    def __init__(self, name: str = "meshc test root") -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str, uris: tuple[str, ...] = (), dns: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a leaf usable as client and server."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_secret(folder: Path, cert: bytes | None = None, key: bytes | None = None, ca: bytes | None = None) -> None:
    """A Kubernetes TLS Secret's files in `folder` (mode 0700, key 0600), each replaced whole (rename)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)):
        if data is None:
            continue
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(folder / name)


def peer_uris(der: bytes) -> list[str]:
    """The URI SANs of a DER certificate (what `SSLSocket.getpeercert(True)` returns)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def server_context(cert: bytes, key: bytes, ca: bytes, folder: Path, require_client: bool = True) -> ssl.SSLContext:
    """A TLS server context that demands a client certificate signed by `ca` (or, with
    `require_client=False`, asks for none)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.crt").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    (folder / "ca.crt").write_bytes(ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.crt", folder / "server.key")
    context.load_verify_locations(folder / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    return context
