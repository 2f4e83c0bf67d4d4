"""Secure aggregation's keys and secret sharing (:mod:`fedge.common.secagg`): X25519 agreement, device
signatures over group keys, commitments, Shamir shares in GF(2^130 - 5) and AES-GCM-SIV sealed shares.

A member's self-mask seed and mask-key seed (128-bit secrets; the X25519 mask key is derived from its seed)
are Shamir-shared (threshold ``t``) to the group, each share sealed under the X25519 agreement of dealer and
holder, so the server relays shares it cannot read. A sealed share is 33 bytes: a 17-byte field element and
the 16-byte tag; the nonce is not sent (it is derived from group, purpose, dealer and holder, and AES-GCM-SIV
stays safe should one ever be reused).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.common.secagg_ring import SecAggError

__all__ = [
    "MIN_GROUP",
    "PRIME",
    "SEALED_LEN",
    "SEED_BYTES",
    "SHARE_LEN",
    "agree",
    "commitment",
    "key_message",
    "keypair_from_seed",
    "new_keypair",
    "open_share",
    "pairwise_seed",
    "seal_share",
    "shamir_combine",
    "shamir_split",
    "share_key",
    "sign",
    "threshold",
    "verify",
]

PRIME = (1 << 130) - 5  # Shamir's field (secrets are 128-bit)
SEED_BYTES = 16
MIN_GROUP = 2  # one member alone would be unmasked by itself
_SHARE = struct.Struct("<HH")


def threshold(group: int, fraction: float) -> int:
    """Shamir threshold ``t`` for a group: ``max(2, ceil(fraction * group))`` capped at the group size."""
    return min(group, max(MIN_GROUP, math.ceil(fraction * group - 1e-9)))


# ---------------------------------------------------------------------------------------------- keys
def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)`` as raw 32-byte strings."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()),
            sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def keypair_from_seed(seed: bytes) -> tuple[bytes, bytes]:
    """The X25519 key pair ``(private, public)`` a 128-bit seed stands for (HKDF-SHA256 of it)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"key seed of {len(seed)} bytes, expected {SEED_BYTES}")
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedge-secagg-x25519").derive(seed)
    sk = X25519PrivateKey.from_private_bytes(raw)
    return raw, sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, label: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 agreement, bound to ``label`` (group id and purpose): 32 bytes."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"bad X25519 key: {e}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedge-secagg|" + label).derive(shared)


def key_message(group_id: str, index: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a member signs with its device key to vouch for its group keys."""
    return b"fedge-secagg-keys|" + group_id.encode() + struct.pack("<H", index) + c_pk + s_pk


def sign(private_pem: bytes, message: bytes) -> bytes:
    """ECDSA (SHA-384) signature with a SuperNode private key (PEM, as ``fedge certs`` issues them)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("device key is not an EC private key")
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(public_pem: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the device key's over ``message``."""
    from cryptography.exceptions import InvalidSignature

    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def commitment(secret: bytes) -> bytes:
    """SHA-256 of a secret: binds a dealer to what its shares must rebuild, reveals nothing of it."""
    return hashlib.sha256(b"fedge-secagg-commit" + secret).digest()


# ---------------------------------------------------------------------------------------------- Shamir
def shamir_split(secret: bytes, n: int, t: int, rng: np.random.Generator | None = None) -> list[int]:
    """Shares of ``secret`` at x = 1..n, any ``t`` of which rebuild it (GF(2^130 - 5))."""
    import secrets as _secrets

    if not 1 <= t <= n:
        raise SecAggError(f"threshold {t} out of range for {n} shares")
    coeffs = [int.from_bytes(secret, "big")] + [_secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out.append(acc)
    return out


def _lagrange_at(points: Mapping[int, int], at: int) -> int:
    xs = list(points)
    acc = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        acc = (acc + points[xi] * num * pow(den, PRIME - 2, PRIME)) % PRIME
    return acc


def shamir_combine(points: Mapping[int, int], t: int) -> bytes:
    """Rebuild the secret from ``{x: share}``; with more than ``t`` points every point must lie on the
    polynomial the first ``t`` define (else :class:`SecAggError`: a dealer or a holder lied)."""
    if len(points) < t:
        raise SecAggError(f"{len(points)} shares, {t} needed")
    xs = sorted(points)
    base = {x: points[x] for x in xs[:t]}
    for x in xs[t:]:
        if _lagrange_at(base, x) != points[x]:
            raise SecAggError(f"share at x={x} is inconsistent with the others")
    secret = _lagrange_at(base, 0)
    if secret >> (8 * SEED_BYTES):
        raise SecAggError("shares rebuild no 128-bit secret")
    return secret.to_bytes(SEED_BYTES, "big")


# ---------------------------------------------------------------------------------------------- shares
SHARE_LEN = 17  # bytes of one GF(2^130 - 5) element
SEALED_LEN = SHARE_LEN + 16  # ciphertext | tag (the nonce is derived, not sent)


def _aad(group_id: str, purpose: bytes, dealer: int, holder: int) -> bytes:
    return b"fedge-secagg-share|" + purpose + b"|" + group_id.encode() + _SHARE.pack(dealer, holder)


def _nonce(aad: bytes) -> bytes:
    return hashlib.sha256(b"fedge-secagg-nonce|" + aad).digest()[:12]


def seal_share(key: bytes, group_id: str, purpose: bytes, dealer: int, holder: int, share: int) -> bytes:
    """AES-GCM-SIV of one share, bound to group, purpose (``b"b"``: self-mask seed, ``b"s"``: mask-key seed),
    dealer and holder: the server relays it and cannot read it, move it to another holder, group or purpose."""
    aad = _aad(group_id, purpose, dealer, holder)
    return AESGCMSIV(key).encrypt(_nonce(aad), share.to_bytes(SHARE_LEN, "big"), aad)


def open_share(key: bytes, group_id: str, purpose: bytes, dealer: int, holder: int, sealed: bytes) -> int:
    """Inverse of :func:`seal_share`; :class:`SecAggError` when it was not sealed for this holder."""
    from cryptography.exceptions import InvalidTag

    if len(sealed) != SEALED_LEN:
        raise SecAggError(f"sealed share of {len(sealed)} bytes, expected {SEALED_LEN}")
    try:
        aad = _aad(group_id, purpose, dealer, holder)
        plain = AESGCMSIV(key).decrypt(_nonce(aad), sealed, aad)
    except InvalidTag:
        raise SecAggError(f"share from member {dealer} does not open (wrong key or tampered)") from None
    return int.from_bytes(plain, "big")


def pairwise_seed(s_private: bytes, peer_s_public: bytes, group_id: str) -> bytes:
    return agree(s_private, peer_s_public, b"mask|" + group_id.encode())


def share_key(c_private: bytes, peer_c_public: bytes, group_id: str) -> bytes:
    return agree(c_private, peer_c_public, b"share|" + group_id.encode())
