"""Signed memories: who made a memory, and that not one byte of it changed since.

A memory directory (``fedmem.memory``) is signed with Ed25519 over a *statement*: the
relative path, size and sha256 of every file in it (``adapter_config.json``,
``adapter_model.safetensors``, ``fedmem.json`` and anything else) and the fingerprint of
the base model it was made for. The statement (the exact bytes signed), the signature and
the signer's public key are kept in the directory as ``fedmem.sig``. Verification
re-hashes every file: a changed, added or removed file, a signature by another key or a
base model with another fingerprint is refused with a message that names it.

A signature says which key made a memory; whether to believe that key is the reader's
decision, never the memory's own. The keys a reader trusts (``Trust``) come from outside
the memory: files the user names (``--trust-key``), the user's trust store
(``$FEDMEM_HOME/trusted-keys/*.pub``), the coordinator key an owner pinned
(``STATE/coordinator-signing.pub``), the coordinator's own key, and the user's local key
that ``fedmem simulate`` signs with. ``trust_for_user`` spells out the rule.

Keys are OpenSSH files: the private key (mode 600) and ``<name>.pub`` beside it, one
``ssh-ed25519 AAAA...`` line; fingerprints read ``SHA256:...`` as ``ssh-keygen -l`` prints them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .base_model import fedmem_home
from .memory import MemoryFormatError, atomic_write_bytes, fsync_path, fsync_tree, replace_dir

log = logging.getLogger(__name__)

SIGNATURE_FILE = "fedmem.sig"
SIGNATURE_FORMAT = "fedmem-signature/1"
STATEMENT_FORMAT = "fedmem-signed-memory/1"
# In a data owner's state dir: the coordinator key it trusts (pinned on first use or given).
PINNED_KEY = "coordinator-signing.pub"
# In the coordinator's state dir: the key every memory version is signed with (.pub beside it).
COORDINATOR_KEY = "memory-signing.key"
# In FEDMEM_HOME: this user's own key (``fedmem simulate`` signs with it) and trusted public keys.
LOCAL_KEY = Path("keys") / "local-signing.key"
TRUST_STORE = "trusted-keys"
# What a received memory may hold: a few files, none bigger than a memory of a large model.
_MAX_FILES = 64


class SignatureError(MemoryFormatError):
    """A memory that is unsigned where a signature is required, tampered with, signed by an
    untrusted key, or a key file that cannot be used."""


# --- Keys ---------------------------------------------------------------------------------

def key_fingerprint(public: Ed25519PublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH key blob, as ``ssh-keygen -l`` prints it."""
    blob = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def public_line(public: Ed25519PublicKey, comment: str = "") -> str:
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def public_key_path(private_key: Path) -> Path:
    """Where a private key's public half is kept: ``memory-signing.key`` -> ``memory-signing.pub``."""
    return Path(private_key).with_suffix(".pub")


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Write ``path`` whole and durably if it does not exist yet; False if it does. A file is
    written beside it, fsynced, then hard-linked into place: two processes racing to create
    the same key both end up with the one that won, never with half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_path(path.parent)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from an OpenSSH (or PKCS#8 PEM) file that only its owner can read."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the memory-signing key ({err.strerror})") from err
    if mode & 0o077:
        raise SignatureError(f"{path}: the memory-signing key is readable by others (mode {stat.S_IMODE(mode):o}); "
                             f"chmod 600 {path}")
    try:
        key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, None))
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not a usable private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key (memories are signed with Ed25519)")
    return key


def ensure_signing_key(path: str | os.PathLike, comment: str = "fedmem memory signing") -> Ed25519PrivateKey:
    """Load the signing key at ``path``, making it on first use (mode 600, written whole), and
    keep its public half in ``<name>.pub`` beside it (mode 644): the file to give readers."""
    path = Path(path).expanduser()
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        if _create_exclusive(path, pem, 0o600):
            log.info("made a new memory-signing key %s in %s", key_fingerprint(key.public_key()), path)
    key = load_signing_key(path)
    line = public_line(key.public_key(), comment)
    pub = public_key_path(path)
    try:
        current = pub.read_text().split()[:2]
    except OSError:
        current = []
    if current != line.split()[:2]:
        atomic_write_bytes(pub, (line + "\n").encode(), mode=0o644)
    return key


def parse_public_key(text: str, source: str = "key") -> Ed25519PublicKey:
    """An Ed25519 public key from an OpenSSH line (``ssh-ed25519 AAAA...``) or a PEM block."""
    text = text.strip()
    if "PRIVATE KEY" in text:
        raise SignatureError(f"{source}: this is a private key; give the public key (the .pub file) instead")
    try:
        key = (serialization.load_pem_public_key(text.encode()) if text.startswith("-----BEGIN")
               else serialization.load_ssh_public_key(text.encode()))
    except (ValueError, TypeError, IndexError) as err:
        raise SignatureError(f"{source}: not a public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{source}: not an Ed25519 public key (memories are signed with Ed25519)")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SignatureError(f"{path}: cannot read the public key ({getattr(err, 'strerror', None) or err})") from err
    return parse_public_key(text, str(path))


def local_key_path() -> Path:
    return fedmem_home() / LOCAL_KEY


def local_signing_key() -> Ed25519PrivateKey:
    """This user's own signing key (``$FEDMEM_HOME/keys/local-signing.key``, made on first use):
    what ``fedmem simulate`` signs its memories with, trusted by this user's ``fedmem ask``."""
    return ensure_signing_key(local_key_path(), "fedmem local memory signing")


# --- Trust --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    fingerprint: str
    source: str  # where the trust comes from, for messages


@dataclass
class Trust:
    """The keys a memory's signature may come from, and whether an unsigned memory is refused."""

    keys: list[TrustedKey] = field(default_factory=list)
    required: bool = False
    # What to do about a signer that is not trusted, for the refusal message.
    hint: str = ("If you expect this signer, compare the fingerprint with its owner and pass its public key "
                 "with --trust-key FILE")

    def add(self, key: Ed25519PublicKey, source: str) -> None:
        fp = key_fingerprint(key)
        if all(k.fingerprint != fp for k in self.keys):
            self.keys.append(TrustedKey(key, fp, source))

    def find(self, fingerprint: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.fingerprint == fingerprint), None)

    def describe(self) -> str:
        if not self.keys:
            return "no memory-signing key is trusted here"
        return "trusted here: " + "; ".join(f"{k.fingerprint} ({k.source})" for k in self.keys)

    @classmethod
    def of_files(cls, paths, required: bool = True, source: str = "--trust-key {path}") -> Trust:
        trust = cls(required=required)
        for p in paths:
            trust.add(load_public_key(p), source.format(path=p))
        return trust


def default_client_state() -> Path:
    """A data owner's default state dir (as ``fedmem.clients.join.default_state_dir``)."""
    return Path(os.environ.get("FEDMEM_CLIENT_STATE", Path.home() / ".fedmem" / "client")).expanduser()


def default_server_state() -> Path:
    """The coordinator's default state dir (as ``fedmem.server.coordinator.default_state_dir``)."""
    return Path(os.environ.get("FEDMEM_SERVER_STATE", Path.home() / ".fedmem" / "server")).expanduser()


def trust_for_user(trust_key_files=(), require: bool = False) -> Trust:
    """The trust of ``fedmem ask`` / ``fedmem eval`` (and the serving path) for this user.

    Trusted keys: every ``--trust-key FILE``; every ``*.pub`` in ``$FEDMEM_HOME/trusted-keys/``;
    the coordinator key pinned in the default client state dir (``$FEDMEM_CLIENT_STATE`` or
    ``~/.fedmem/client``); the coordinator's own key in the default server state dir
    (``$FEDMEM_SERVER_STATE`` or ``~/.fedmem/server``); and this user's local key (made by
    ``fedmem simulate``). A signature is *required* (an unsigned memory refused) when ``require``
    or when any key but the local one is trusted: the local key is made without being asked
    for, so it alone does not turn the rule on. A broken key file is an error, never skipped.
    """
    trust = Trust()
    for p in trust_key_files or ():
        trust.add(load_public_key(p), f"--trust-key {p}")
    store = fedmem_home() / TRUST_STORE
    for p in sorted(store.glob("*.pub")) if store.is_dir() else ():
        trust.add(load_public_key(p), f"trust store {p}")
    pinned = default_client_state() / PINNED_KEY
    if pinned.is_file():
        trust.add(load_public_key(pinned), f"coordinator key pinned in {pinned}")
    own = public_key_path(default_server_state() / COORDINATOR_KEY)
    if own.is_file():
        trust.add(load_public_key(own), f"this coordinator's own key {own}")
    trust.required = require or bool(trust.keys)
    local = public_key_path(local_key_path())
    if local.is_file():
        trust.add(load_public_key(local), f"your local key {local}")
    return trust


def trust_for_client(state: str | os.PathLike, trust_key_files=()) -> Trust:
    """A data owner's trust (``fedmem-client pull``): the coordinator key pinned in its state dir
    and any ``--trust-key FILE``; a signature is required as soon as there is one."""
    trust = Trust()
    pinned = Path(state).expanduser() / PINNED_KEY
    if pinned.is_file():
        trust.add(load_public_key(pinned), f"coordinator key pinned in {pinned}")
    for p in trust_key_files or ():
        trust.add(load_public_key(p), f"--trust-key {p}")
    trust.required = bool(trust.keys)
    return trust


def pin_coordinator_key(state: str | os.PathLike, key_file: str | os.PathLike) -> tuple[str, bool]:
    """``fedmem-client join --coordinator-key FILE``: pin the key the operator gave in the state dir.
    Returns (fingerprint, whether it was newly pinned); a different key already pinned is an error."""
    key = load_public_key(key_file)
    fp = key_fingerprint(key)
    pinned = Path(state).expanduser() / PINNED_KEY
    if _create_exclusive(pinned, (public_line(key, "fedmem coordinator") + "\n").encode(), 0o644):
        return fp, True
    old = key_fingerprint(load_public_key(pinned))
    if old != fp:
        raise SignatureError(f"--coordinator-key {key_file} is {fp}, but {pinned} already pins the coordinator key "
                             f"{old}; if the coordinator's key really changed, delete {pinned} and join again")
    return fp, False


# --- Signing and verifying a directory ------------------------------------------------------

def _regular_file_sha256(path: Path, shown: str) -> tuple[int, str]:
    """(size, sha256) of a regular file, opened without following a link or blocking on a FIFO
    swapped in after it was listed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SignatureError(f"{shown} is not a regular file; a signed memory holds regular files only")
        digest = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def list_files(directory: str | os.PathLike) -> list[dict]:
    """Every file under ``directory`` but the signature: relative path, size and sha256, sorted.
    Links and special files are refused: a signed memory holds regular files only."""
    directory = Path(directory)
    out = []

    def walk(d: Path) -> None:
        for entry in sorted(d.iterdir()):
            rel = entry.relative_to(directory).as_posix()
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise SignatureError(f"{directory}: {rel} is a symbolic link; a signed memory holds regular files only")
            if stat.S_ISDIR(st.st_mode):
                walk(entry)
            elif stat.S_ISREG(st.st_mode):
                if rel != SIGNATURE_FILE:
                    try:
                        size, sha = _regular_file_sha256(entry, f"{directory}: {rel}")
                    except OSError as err:
                        raise SignatureError(f"{directory}: {rel} cannot be read ({err.strerror})") from err
                    out.append({"path": rel, "size": size, "sha256": sha})
            else:
                raise SignatureError(f"{directory}: {rel} is not a regular file; a signed memory holds regular "
                                     "files only")

    walk(directory)
    return out


def sign_memory(directory: str | os.PathLike, key: Ed25519PrivateKey, base_fingerprint: str | None) -> str:
    """Sign every file of ``directory`` (and the base fingerprint) into ``fedmem.sig``; returns the
    signer's fingerprint. Anything written into the directory afterwards breaks the signature."""
    directory = Path(directory)
    statement = {
        "format": STATEMENT_FORMAT,
        "base_fingerprint": base_fingerprint,
        "files": list_files(directory),
        "signed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    public = key.public_key()
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "public_key": public_line(public),
        "key_fingerprint": key_fingerprint(public),
        "statement": base64.b64encode(payload).decode(),
        "signature": base64.b64encode(key.sign(payload)).decode(),
    }
    atomic_write_bytes(directory / SIGNATURE_FILE, json.dumps(document, indent=1).encode(), mode=0o644)
    return document["key_fingerprint"]


@dataclass(frozen=True)
class Signature:
    key: Ed25519PublicKey
    fingerprint: str
    statement: dict

    @property
    def base_fingerprint(self) -> str | None:
        return self.statement.get("base_fingerprint")


def read_signature(directory: str | os.PathLike) -> Signature | None:
    """The signature in ``directory``, checked against the key it names (not yet against the files
    or any trusted key); None if the directory has no ``fedmem.sig``."""
    path = Path(directory) / SIGNATURE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file() or path.is_symlink():
        raise SignatureError(f"{path}: not a regular file")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != "ed25519":
            raise ValueError(f"not a {SIGNATURE_FORMAT} ed25519 signature")
        key = parse_public_key(str(doc["public_key"]), f"{path}: public_key")
        payload = base64.b64decode(str(doc["statement"]), validate=True)
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise SignatureError(f"{path}: corrupt signature file ({err})") from err
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise SignatureError(f"{path}: the signature does not verify with the key it names "
                             "(the signature file was altered)") from None
    try:
        statement = json.loads(payload)
        if not isinstance(statement, dict) or statement.get("format") != STATEMENT_FORMAT:
            raise ValueError(f"not a {STATEMENT_FORMAT} statement")
        files = statement["files"]
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str) for f in files):
            raise ValueError("malformed file list")
    except (ValueError, KeyError) as err:
        raise SignatureError(f"{path}: unreadable signed statement ({err})") from err
    return Signature(key, key_fingerprint(key), statement)


def check_files(directory: str | os.PathLike, signature: Signature) -> None:
    """Every file listed in the signature is there with its size and sha256, and no other."""
    directory = Path(directory)
    signed = {f["path"]: f for f in signature.statement["files"]}
    present = {f["path"]: f for f in list_files(directory)}
    for rel in sorted(signed.keys() - present.keys()):
        raise SignatureError(f"{directory}: {rel} is listed in the signature but missing (removed after signing); "
                             "the memory was tampered with")
    for rel in sorted(present.keys() - signed.keys()):
        raise SignatureError(f"{directory}: {rel} is not covered by the signature (added after signing); "
                             "the memory was tampered with")
    for rel in sorted(signed):
        if (signed[rel]["size"], signed[rel]["sha256"]) != (present[rel]["size"], present[rel]["sha256"]):
            raise SignatureError(f"{directory}: {rel} was modified after signing (its sha256 differs from the "
                                 "signed one); the memory was tampered with")


def verify_signature(directory: str | os.PathLike, trust: Trust | None, require: bool = False) -> Signature | None:
    """Check ``directory``'s signature: valid, by a trusted key (when ``trust`` is given; None checks
    integrity only), over exactly the files present. Returns it, or None for an unsigned memory
    where none is required (``require`` or ``trust.required``)."""
    directory = Path(directory)
    signature = read_signature(directory)
    if signature is None:
        if require or (trust is not None and trust.required):
            raise SignatureError(f"{directory}: the memory is not signed (no {SIGNATURE_FILE}), but a signed one "
                                 f"is required ({trust.describe() if trust else 'a signature was asked for'}); "
                                 "refusing it")
        return None
    if trust is not None and trust.find(signature.fingerprint) is None:
        raise SignatureError(f"{directory}: signed by an untrusted key with fingerprint {signature.fingerprint} "
                             f"({trust.describe()}). {trust.hint}")
    check_files(directory, signature)
    return signature


# --- Moving a signed memory: coordinator -> owner -------------------------------------------

def pack_memory(directory: str | os.PathLike) -> dict[str, bytes]:
    """Every file of a signed memory, by relative path, byte for byte (to send in a Flower
    ConfigRecord); checked first, so damage is never sent."""
    directory = Path(directory)
    if verify_signature(directory, None, require=True) is None:  # pragma: no cover - require raises
        raise SignatureError(f"{directory}: not signed")
    files = {f["path"]: (directory / f["path"]).read_bytes() for f in list_files(directory)}
    files[SIGNATURE_FILE] = (directory / SIGNATURE_FILE).read_bytes()
    return files


def _safe_relative(name: object) -> str:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        raise SignatureError(f"received memory: file name {name!r} is not a plain relative path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise SignatureError(f"received memory: file name {name!r} is not a plain relative path")
    return name


def receive_memory(files: dict[str, bytes], state: str | os.PathLike, base_fingerprint: str,
                   name: str = "memory") -> tuple[dict, str | None]:
    """Keep a signed memory sent by the coordinator as ``STATE/<name>``, byte for byte.

    The files are written to a private directory beside it and verified there: the signature
    must be by the coordinator key pinned in ``STATE/coordinator-signing.pub``, or, when none
    is pinned yet, the signer's key is pinned now (trust on first use); every file must be the
    one signed; the memory must be made for ``base_fingerprint``. Only then is it renamed into
    place. Returns (the manifest, the fingerprint pinned now or None); raises
    ``MemoryFormatError``/``SignatureError`` (the kept memory untouched) otherwise.
    """
    from .memory import verify_memory

    state = Path(state)
    if SIGNATURE_FILE not in files:
        raise SignatureError(f"the memory received is not signed (no {SIGNATURE_FILE}); not kept")
    if len(files) > _MAX_FILES:
        raise SignatureError(f"the memory received has {len(files)} files; not kept")
    state.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.incoming-", dir=state))
    try:
        for rel, data in files.items():
            path = tmp / _safe_relative(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(bytes(data))
        pinned_file = state / PINNED_KEY
        trust = Trust(required=True, hint=f"If the coordinator's key really changed, delete {pinned_file} and join "
                      "again (with --coordinator-key FILE to pin the new key beforehand)")
        try:
            signature = read_signature(tmp)
            if pinned_file.exists():
                trust.add(load_public_key(pinned_file), f"coordinator key pinned in {pinned_file}")
            else:
                trust.add(signature.key, "first use")
            manifest = verify_memory(tmp, base_fingerprint, trust=trust, require_signature=True)
        except MemoryFormatError as err:  # named as what it is, not by the temporary directory
            raise type(err)(str(err).replace(str(tmp), "the memory received")) from None
        pinned_now = None
        if not pinned_file.exists():
            line = (public_line(signature.key, "fedmem coordinator") + "\n").encode()
            if _create_exclusive(pinned_file, line, 0o644):
                pinned_now = signature.fingerprint
            elif key_fingerprint(load_public_key(pinned_file)) != signature.fingerprint:
                raise SignatureError(f"another coordinator key was pinned in {pinned_file} meanwhile; not kept")
        fsync_tree(tmp)
        replace_dir(tmp, state / name)
        return manifest, pinned_now
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_memory(source: str | os.PathLike, dest: str | os.PathLike, durable: bool = True) -> None:
    """Copy a memory directory byte for byte (links as links, so verification refuses them; FIFOs
    and other special files left out, so a copy never blocks on one), every file fsynced if ``durable``."""
    def special(directory, names):
        out = []
        for name in names:
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                out.append(name)
        return out

    shutil.copytree(source, dest, symlinks=True, ignore=special, copy_function=shutil.copyfile)
    if durable:
        fsync_tree(dest)


def signer(directory: str | os.PathLike) -> str | None:
    """The fingerprint a memory's ``fedmem.sig`` names (for display, after verification)."""
    try:
        sig = read_signature(directory)
    except MemoryFormatError:
        return None
    return sig.fingerprint if sig else None
