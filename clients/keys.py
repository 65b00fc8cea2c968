"""A data owner's identity: an EC (P-384) key pair, made on first join and kept in the client's state dir.

The SuperNode signs every request with the private key; the coordinator admits the
public key (``fedmem-server clients add``). Both are in OpenSSH format, the one
Flower's SuperNode and ``flwr supernode register`` read. Owners compare keys by
fingerprint (``SHA256:...``, as ``ssh-keygen -l`` prints it).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmem.memory import atomic_write_bytes

PRIVATE_KEY = "client.key"
PUBLIC_KEY = "client.pub"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, or not an EC public key."""


@dataclass
class ClientKeys:
    private_key: Path
    public_key: Path
    public_text: str
    fingerprint: str
    created: bool


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_of_public_pem(pem: bytes) -> str:
    return fingerprint(serialization.load_pem_public_key(pem))


def parse_public_key(text: str) -> tuple[str, str]:
    """An OpenSSH public key line -> (normalised line without comment, fingerprint)."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError("not an EC public key; Flower's SuperNode authentication needs a NIST EC key "
                        "(fedmem-client join makes one)")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return line, fingerprint(key)


def ensure_keys(directory: Path) -> ClientKeys:
    """Load the client's key pair, creating it on first use."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    created = False
    if not private.is_file():
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        atomic_write_bytes(private, pem)
        created = True
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{private}: unreadable private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{private}: not an EC private key")
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    if not public.is_file() or public.read_text().split()[:2] != line.split()[:2]:
        atomic_write_bytes(public, (line + "\n").encode(), mode=0o644)
    return ClientKeys(private, public, line, fingerprint(key.public_key()), created)
