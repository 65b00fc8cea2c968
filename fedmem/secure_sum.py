"""Secure aggregation: the coordinator learns the sum of the owners' vectors and nothing else.

The protocol is Bonawitz et al.'s (CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") on the complete graph of a round's owners, in plain
functions; ``fedmem.flower.secure_round`` only carries their inputs and outputs. Per round:

1. **keys**: every owner makes two fresh X25519 key pairs, one to agree pairwise masks
   (``mask``), one to encrypt the shares it sends the others (``share``), and sends the
   public halves.
2. **shares**: every owner picks a random self-mask seed, splits the seed and its mask
   private key into Shamir shares (threshold t of n), and sends each other owner its share,
   encrypted and authenticated (ChaCha20-Poly1305 under a key agreed with that owner; the
   round's session, the sender and the receiver are the associated data, so a share
   replayed from another round or relabelled is refused).
3. **masked**: every owner encodes its vector in fixed point on Z_(2^64) and adds a
   pseudorandom mask from its seed plus, for every other owner j, ± a mask from the secret
   it shares with j (+ if its node id is the smaller). Summed over all owners, the pairwise
   masks cancel.
4. **unmask**: the coordinator names who sent a masked vector (survivors) and who did not
   (dropped); each survivor returns its shares of the survivors' seeds and of the dropped
   owners' mask keys, never both for one owner. With t shares the coordinator rebuilds
   them, removes the survivors' self masks and the dropped owners' pairwise masks, and
   holds Σ x over the survivors.

Each mask is a ChaCha20 keystream, so a masked vector is uniform to anyone without the
keys. Written here, not taken from Flower: its SecAgg+ server workflow runs only under the
legacy strategy API, and its client mod seeds masks through a 32-bit NumPy seed, which a
coordinator can search. The primitives are ``cryptography``'s and pycryptodome's (Shamir).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

# Fixed point on Z_(2^64): a value x travels as round(x · 2^FRACTION_BITS). Values are clipped to
# ±BOUND first, so a sum of up to 2^(63 - 16 - 32) = 32,768 owners' values cannot wrap.
FRACTION_BITS = 32
BOUND = 2.0**15
MAX_OWNERS = 2**15
SECRET_BYTES = 32
_CHUNK = 16  # pycryptodome's Shamir shares 16-byte secrets (elements of GF(2^128))
_SHARE_INFO = b"fedmem secure aggregation: shares"
_MASK_INFO = b"fedmem secure aggregation: pairwise mask"


class SecureAggregationError(ValueError):
    """A step of the protocol refused its input (a wrong share, a bad roster, too few owners)."""


def threshold(owners: int) -> int:
    """Shares needed to rebuild a secret: a majority of the round's owners, at least two.

    Fewer than t owners together (the coordinator included) learn nothing of any one owner's
    vector; up to n − t owners may drop after masking and the round still completes.
    """
    if owners < 2:
        raise SecureAggregationError(f"secure aggregation needs at least 2 owners, got {owners}")
    if owners > MAX_OWNERS:
        raise SecureAggregationError(f"secure aggregation supports at most {MAX_OWNERS} owners, got {owners}")
    return max(2, owners // 2 + 1)


# --- fixed point -------------------------------------------------------------------------


def encode(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(values in fixed point as uint64, how many were clipped to ±BOUND)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise SecureAggregationError("a value to aggregate is not finite")
    clipped = int(np.count_nonzero(np.abs(values) > BOUND))
    fixed = np.rint(np.clip(values, -BOUND, BOUND) * 2.0**FRACTION_BITS).astype(np.int64)
    return fixed.view(np.uint64), clipped


def decode(fixed: np.ndarray) -> np.ndarray:
    """A sum in fixed point back to float64 (two's complement: the sum's sign survives the ring)."""
    return np.asarray(fixed, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS


# --- keys, shares --------------------------------------------------------------------------


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _public(raw: bytes, what: str) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise SecureAggregationError(f"{what} is not a 32-byte X25519 public key")
    return X25519PublicKey.from_public_bytes(raw)


def _agree(private: bytes, public: bytes, info: bytes, session: bytes, what: str) -> bytes:
    secret = X25519PrivateKey.from_private_bytes(private).exchange(_public(public, what))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=info).derive(secret)


@dataclass
class OwnerKeys:
    """One owner's secrets for one round (kept in its own process, never sent)."""

    mask_private: bytes
    share_private: bytes
    seed: bytes = b""
    # sender node id -> (its share of that sender's seed, its share of that sender's mask key)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    @classmethod
    def fresh(cls) -> "OwnerKeys":
        return cls(_raw_private(X25519PrivateKey.generate()), _raw_private(X25519PrivateKey.generate()))

    def public(self) -> tuple[bytes, bytes]:
        """(mask public key, share public key): what the owner sends in the keys step."""
        return (_raw_public(X25519PrivateKey.from_private_bytes(self.mask_private)),
                _raw_public(X25519PrivateKey.from_private_bytes(self.share_private)))


def check_roster(roster: dict[int, tuple[bytes, bytes]], me: int, mine: tuple[bytes, bytes]) -> None:
    """The owners' public keys as the coordinator relays them: this owner's own keys as it sent
    them, every key a valid X25519 key, no key twice (a coordinator copying one owner's key to a
    second id would have that owner's masks cancel against nothing)."""
    if roster.get(me) != mine:
        raise SecureAggregationError("the roster does not carry this owner's own public keys")
    keys = [k for pair in roster.values() for k in pair]
    for node, (mask, share) in roster.items():
        _public(mask, f"node {node}'s mask key")
        _public(share, f"node {node}'s share key")
    if len(set(keys)) != len(keys):
        raise SecureAggregationError("the roster carries a public key twice")
    threshold(len(roster))


def _split(secret: bytes, t: int, n: int) -> list[bytes]:
    """n Shamir shares of a 32-byte secret, share i (1-based) as index (4 bytes) + one 16-byte share per chunk."""
    if len(secret) != SECRET_BYTES:
        raise SecureAggregationError(f"a shared secret must be {SECRET_BYTES} bytes")
    shares = [struct.pack(">I", i) for i in range(1, n + 1)]
    for start in range(0, SECRET_BYTES, _CHUNK):
        for i, (index, part) in enumerate(Shamir.split(t, n, secret[start:start + _CHUNK], ssss=False)):
            assert index == i + 1
            shares[i] += part
    return shares


def _combine(shares: list[bytes], t: int, what: str) -> bytes:
    if len(shares) < t:
        raise SecureAggregationError(f"{what}: {len(shares)} shares, {t} needed")
    size = 4 + SECRET_BYTES
    if any(len(s) != size for s in shares):
        raise SecureAggregationError(f"{what}: a share is not {size} bytes")
    indices = [struct.unpack(">I", s[:4])[0] for s in shares]
    if len(set(indices)) != len(indices):
        raise SecureAggregationError(f"{what}: two shares with the same index")
    secret = b""
    for start in range(4, size, _CHUNK):
        secret += Shamir.combine([(i, s[start:start + _CHUNK]) for i, s in zip(indices, shares)], ssss=False)
    return secret


def _rebuild(shares: dict[int, bytes], t: int, what: str, valid) -> tuple[bytes, list[int]]:
    """The secret from the owners' shares (owner node id -> share) that passes ``valid``, and the owners
    whose shares disagree with it. All shares at once first; if that fails (someone sent a wrong one),
    subsets of t, so up to n − t wrong shares are found and named."""
    owners = sorted(shares)
    try:
        secret = _combine([shares[o] for o in owners], t, what)
        if valid(secret):
            return secret, []
    except ValueError:
        pass
    for tries, subset in enumerate(itertools.combinations(owners, t)):
        if tries >= 10_000:
            break
        try:
            secret = _combine([shares[o] for o in subset], t, what)
        except ValueError:
            continue
        if valid(secret):
            wrong = [o for o in owners if o not in subset and _combine(
                [shares[s] for s in subset[:t - 1]] + [shares[o]], t, what) != secret]
            return secret, wrong
    raise SecureAggregationError(f"{what}: no {t} of the {len(owners)} shares rebuild it")


def _associated(session: bytes, src: int, dst: int) -> bytes:
    return session + struct.pack(">QQ", src, dst)  # Flower node ids are unsigned 64-bit


def commitment(seed: bytes, session: bytes) -> bytes:
    """What an owner commits to its self-mask seed with (sent in the shares step): the coordinator checks the
    seed it rebuilds against it, so a wrong share is caught instead of silently corrupting the sum."""
    return hashlib.sha256(b"fedmem seed" + session + seed).digest()


def share_secrets(keys: OwnerKeys, me: int, roster: dict[int, tuple[bytes, bytes]], session: bytes
                  ) -> tuple[dict[int, bytes], bytes]:
    """Step 2: pick the self-mask seed; every other owner's shares of it and of the mask key, encrypted
    to it, and the commitment to the seed."""
    order = sorted(roster)
    t = threshold(len(order))
    keys.seed = os.urandom(SECRET_BYTES)
    seed_shares = _split(keys.seed, t, len(order))
    key_shares = _split(keys.mask_private, t, len(order))
    keys.held = {me: (seed_shares[order.index(me)], key_shares[order.index(me)])}
    out = {}
    for i, node in enumerate(order):
        if node == me:
            continue
        key = _agree(keys.share_private, roster[node][1], _SHARE_INFO, session, f"node {node}'s share key")
        nonce = os.urandom(12)
        out[node] = nonce + ChaCha20Poly1305(key).encrypt(nonce, seed_shares[i] + key_shares[i],
                                                          _associated(session, me, node))
    return out, commitment(keys.seed, session)


def open_shares(keys: OwnerKeys, me: int, roster: dict[int, tuple[bytes, bytes]], session: bytes,
                ciphertexts: dict[int, bytes]) -> None:
    """Step 3, first half: decrypt and keep the shares the others sent this owner. Any that fails
    its authentication (wrong key, another round's, sent to someone else, altered) is refused,
    and so is a sender not in the roster."""
    size = 2 * (4 + SECRET_BYTES)
    for src, blob in ciphertexts.items():
        if src not in roster or src == me:
            raise SecureAggregationError(f"a share from node {src}, which is not another owner of this round")
        key = _agree(keys.share_private, roster[src][1], _SHARE_INFO, session, f"node {src}'s share key")
        try:
            plain = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], _associated(session, src, me))
        except (InvalidTag, ValueError):
            raise SecureAggregationError(f"the share from node {src} does not authenticate "
                                         "(altered, replayed from another round, or meant for another owner)") from None
        if len(plain) != size:
            raise SecureAggregationError(f"the share from node {src} has the wrong length")
        keys.held[src] = (plain[:size // 2], plain[size // 2:])


# --- masks ---------------------------------------------------------------------------------


def _stream(seed: bytes, count: int) -> np.ndarray:
    """``count`` uniform uint64s from a 32-byte seed: a ChaCha20 keystream (the key is used once,
    so the nonce can be fixed)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)


def _pair_seed(private: bytes, public: bytes, session: bytes, node: int) -> bytes:
    return _agree(private, public, _MASK_INFO, session, f"node {node}'s mask key")


def mask(fixed: np.ndarray, keys: OwnerKeys, me: int, roster: dict[int, tuple[bytes, bytes]],
         session: bytes) -> np.ndarray:
    """Step 3, second half: the owner's fixed-point vector plus its self mask and its pairwise masks
    with every owner whose shares it holds (the others never got this owner's shares either)."""
    if not keys.seed:
        raise SecureAggregationError("no self-mask seed: the shares step did not run")
    out = np.asarray(fixed, dtype=np.uint64) + _stream(keys.seed, fixed.size)
    for node in sorted(keys.held):
        if node == me:
            continue
        pair = _stream(_pair_seed(keys.mask_private, roster[node][0], session, node), fixed.size)
        out = out + pair if me < node else out - pair
    return out


def reveal(keys: OwnerKeys, me: int, survivors: list[int], dropped: list[int], owners: int) -> dict[int, bytes]:
    """Step 4 (an owner): its share of each survivor's seed and of each dropped owner's mask key.
    An owner named as both, or not an owner of the round, is refused: both shares of one owner
    would let the coordinator unmask that owner's vector alone. ``owners``: the round's roster size."""
    if set(survivors) & set(dropped):
        raise SecureAggregationError("an owner is named both as having sent its vector and as dropped")
    unknown = sorted((set(survivors) | set(dropped)) - set(keys.held))
    if unknown:
        raise SecureAggregationError(f"node {unknown[0]} sent this owner no shares this round")
    if me not in survivors:
        raise SecureAggregationError("this owner sent its vector but is not named among those who did")
    if len(survivors) < threshold(owners):
        raise SecureAggregationError(f"only {len(survivors)} owners sent their vectors, {threshold(owners)} needed")
    return {**{n: keys.held[n][0] for n in survivors}, **{n: keys.held[n][1] for n in dropped}}


def unmask(masked_sum: np.ndarray, roster: dict[int, tuple[bytes, bytes]], session: bytes,
           survivors: list[int], dropped: list[int], revealed: dict[int, dict[int, bytes]],
           commitments: dict[int, bytes]) -> tuple[np.ndarray, list[int]]:
    """Step 4 (the coordinator): Σ of the survivors' fixed-point vectors from the sum of their masked
    ones, and the owners that revealed a wrong share. ``revealed``: each answering owner's ``reveal``
    output, by that owner's node id; ``commitments``: each owner's seed commitment (shares step).
    Every rebuilt secret is checked: a seed against its commitment, a mask key against its public key."""
    t = threshold(len(roster))
    out = np.asarray(masked_sum, dtype=np.uint64).copy()
    liars: set[int] = set()

    def shares_of(node: int) -> dict[int, bytes]:
        return {holder: r[node] for holder, r in revealed.items() if node in r}

    for node in survivors:
        seed, wrong = _rebuild(shares_of(node), t, f"node {node}'s seed",
                               lambda s, n=node: commitment(s, session) == commitments.get(n))
        liars.update(wrong)
        out = out - _stream(seed, out.size)
    for gone in dropped:
        private, wrong = _rebuild(
            shares_of(gone), t, f"node {gone}'s mask key",
            lambda s, g=gone: _raw_public(X25519PrivateKey.from_private_bytes(s)) == roster[g][0])
        liars.update(wrong)
        for node in survivors:
            pair = _stream(_pair_seed(private, roster[node][0], session, node), out.size)
            # The survivor added +pair if its id is the smaller, so take that back.
            out = out - pair if node < gone else out + pair
    return out, sorted(liars)
