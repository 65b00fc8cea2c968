"""The federation's own certificate authority and the SuperLink's TLS certificate.

Made once, on the first ``fedmem-server start``, and kept in the server's state dir:
the CA certificate is what every data owner needs to verify the server (``--ca``);
the CA key never leaves the state dir. The server certificate is re-issued whenever
the set of host names changes, so adding ``--host`` later needs no manual step.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmem.memory import atomic_write_bytes

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_YEARS = 10
SERVER_DAYS = 825  # the longest lifetime common TLS clients accept for a leaf certificate


@dataclass
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    hosts: list[str]

    def fingerprint(self) -> str:
        return ca_fingerprint(self.ca_cert)


def ca_fingerprint(ca_cert: Path) -> str:
    """SHA-256 of the CA certificate (DER), as ``AB:CD:...``: what owners compare out of band."""
    cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _cert_hosts(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def _normalise_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for host in [*DEFAULT_HOSTS, *hosts]:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            host = host.lower()
        if host not in out:
            out.append(host)
    return out


def ensure_certificates(directory: Path, hosts: list[str] | tuple[str, ...] = ()) -> Certificates:
    """Create the CA (once) and a server certificate valid for ``hosts`` (plus loopback)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    names = _normalise_hosts(hosts)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not (ca_cert_path.is_file() and ca_key_path.is_file()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmem federation CA")])
        ca_cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        atomic_write_bytes(ca_key_path, _key_pem(ca_key))
        atomic_write_bytes(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        # A new CA invalidates any server certificate signed by an old one.
        (directory / SERVER_CERT).unlink(missing_ok=True)

    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    server_cert_path, server_key_path = directory / SERVER_CERT, directory / SERVER_KEY
    if server_cert_path.is_file() and server_key_path.is_file():
        current = x509.load_pem_x509_certificate(server_cert_path.read_bytes())
        still_valid = current.not_valid_after_utc > now + datetime.timedelta(days=30)
        if still_valid and set(names) <= _cert_hosts(current):
            return Certificates(ca_cert_path, server_cert_path, server_key_path, sorted(_cert_hosts(current)))

    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "fedmem")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    atomic_write_bytes(server_key_path, _key_pem(key))
    atomic_write_bytes(server_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return Certificates(ca_cert_path, server_cert_path, server_key_path, names)
