"""Secure aggregation math for one group of devices (SecAgg, Bonawitz et al., CCS 2017): pure functions.

A group of ``K`` devices is one aggregation buffer. Each member ``i`` holds two fresh X25519 key pairs for the
group (``c``: encrypts shares to the other members; ``s``: pairwise mask agreement) and sends

    y_i = q(x_i) + PRG(b_i) + sum_{j != i} sign(i, j) PRG(s_ij)   (mod 2^RING_BITS)

where ``q`` is the stochastic quantisation of its clipped update on the group's shared random index set,
``b_i`` a fresh self-mask seed and ``s_ij`` the X25519 agreement of ``i``'s and ``j``'s ``s`` keys (``+`` when
``i < j``). Pairwise masks cancel in the group's sum. ``b_i`` and the ``s`` private key are Shamir-shared
(threshold ``t``) to the members, encrypted with AES-GCM under the ``c`` agreement. For the unmasking the
server asks the members that are still online, for each sender, a share of ``b_i``, and for each member that
sent nothing, a share of its ``s`` key; ``t`` answers rebuild them, so up to ``K - t`` members may be gone
(whether they dropped before or after sending). A member never reveals both secrets of one member.

Ring arithmetic is mod ``2^RING_BITS`` in ``uint32``; the quantisation leaves ``HEADROOM_BITS`` unused so that
an honest sum never wraps and a garbage mask is caught by a range check on the unmasked sum. Shamir shares
live in GF(2^521 - 1) (Python integers; a secret is 32 bytes). No Flower, no I/O.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "HEADROOM_BITS",
    "MAGIC",
    "MIN_GROUP",
    "PRIME",
    "RING_BITS",
    "SEALED_LEN",
    "SEED_BYTES",
    "SHARE_LEN",
    "SKETCH_ROWS",
    "GroupSpec",
    "KeyShares",
    "MaskedUpdate",
    "Quantizer",
    "SecAggError",
    "agree",
    "commitment",
    "decode_masked",
    "encode_masked",
    "expand",
    "flatten",
    "from_ring",
    "in_range",
    "index_set",
    "key_message",
    "mask",
    "member_keys",
    "member_mask",
    "member_reveal",
    "new_keypair",
    "open_share",
    "pack",
    "pair_sign",
    "pairwise_seed",
    "prg",
    "ring_add",
    "scatter",
    "seal_share",
    "server_unmask",
    "shamir_combine",
    "shamir_split",
    "share_key",
    "sign",
    "sketch",
    "sketch_hash",
    "threshold",
    "to_ring",
    "unflatten",
    "unmask_sum",
    "unpack",
    "unsketch_topk",
    "verify",
]

RING_BITS = 20  # masked values travel as 20-bit ring elements (2.5 bytes each)
HEADROOM_BITS = 4  # an honest group sum uses at most 2^(RING_BITS - HEADROOM_BITS - 1) levels either way
PRIME = (1 << 521) - 1  # Mersenne prime of Shamir's field (secrets are 256-bit)
SEED_BYTES = 32
MAGIC = b"FDGS"
MIN_GROUP = 2  # one member alone would be unmasked by itself
_SHARE = struct.Struct("<HH")


class SecAggError(ValueError):
    """A masked payload, share or key is malformed, or a reconstruction is inconsistent."""


# ---------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class Quantizer:
    """Clip-and-quantise into the ring: ``k`` kept coordinates, group size ``group``, L2 clip ``clip``.

    Each coordinate is clipped to ``[-r, r]`` with ``r = 4 clip / sqrt(k)`` (four times the coordinate of a
    norm-``clip`` vector spread evenly; what a device clips goes to its error feedback) and rounded
    stochastically to ``q_max`` levels per side, ``q_max = (2^(RING_BITS-HEADROOM_BITS-1) - 1) // group``, so
    the sum of ``group`` values never leaves ``[-2^(RING_BITS-HEADROOM_BITS-1), ...]``.
    """

    clip: float
    k: int
    group: int

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.k < 1 or self.group < 1:
            raise SecAggError(f"bad quantizer clip={self.clip} k={self.k} group={self.group}")
        if self.q_max < 15:
            raise SecAggError(f"group of {self.group} leaves {self.q_max} levels per value (ring too small)")

    @property
    def r(self) -> float:
        return 4.0 * self.clip / math.sqrt(self.k)

    @property
    def q_max(self) -> int:
        return ((1 << (RING_BITS - HEADROOM_BITS - 1)) - 1) // self.group

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stochastic rounding of ``clip(x, -r, r) / r * q_max`` (unbiased inside the range); int64."""
        z = np.clip(np.asarray(x, np.float64), -self.r, self.r) / self.r * self.q_max
        lo = np.floor(z)
        return (lo + (rng.random(z.shape) < (z - lo))).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, np.float64) * (self.r / self.q_max)).astype(np.float32)


def threshold(group: int, fraction: float) -> int:
    """Shamir threshold ``t`` for a group: ``max(2, ceil(fraction * group))`` capped at the group size."""
    return min(group, max(MIN_GROUP, math.ceil(fraction * group - 1e-9)))


def index_set(seed: bytes, n: int, k: int) -> np.ndarray:
    """The group's ``k`` coordinates out of ``n`` (sorted): random from the public group seed, same for all."""
    if not 0 < k <= n:
        raise SecAggError(f"cannot keep {k} of {n} coordinates")
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(hashlib.sha256(seed).digest()[:16], "little")))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- ring
def prg(seed: bytes, k: int) -> np.ndarray:
    """``k`` ring elements from AES-128-CTR keyed by ``seed`` (uint32, < 2^RING_BITS)."""
    key = hashlib.sha256(b"fedge-secagg-prg" + seed).digest()[:16]
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(b"\0" * (4 * k)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4") & np.uint32((1 << RING_BITS) - 1)


def to_ring(q: np.ndarray) -> np.ndarray:
    return (np.asarray(q, np.int64) % (1 << RING_BITS)).astype(np.uint32)


def from_ring(v: np.ndarray) -> np.ndarray:
    """Centered lift: ring elements -> signed integers in ``[-2^(RING_BITS-1), 2^(RING_BITS-1))``."""
    x = np.asarray(v, np.int64) % (1 << RING_BITS)
    return np.where(x >= 1 << (RING_BITS - 1), x - (1 << RING_BITS), x)


def ring_add(a: np.ndarray, b: np.ndarray, sign: int = 1) -> np.ndarray:
    m = np.uint32((1 << RING_BITS) - 1)
    return ((a.astype(np.uint32) + (b.astype(np.uint32) if sign > 0 else (~b.astype(np.uint32) + 1))) & m)


def pack(v: np.ndarray) -> bytes:
    """Ring elements -> ``RING_BITS`` bits each, little-endian bit order, padded to a byte."""
    bits = ((np.asarray(v, np.uint32)[:, None] >> np.arange(RING_BITS, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def unpack(buf: bytes, k: int) -> np.ndarray:
    need = (k * RING_BITS + 7) // 8
    if len(buf) != need:
        raise SecAggError(f"masked vector of {len(buf)} bytes, expected {need} for {k} values")
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: k * RING_BITS].reshape(k, RING_BITS)
    return (bits.astype(np.uint32) << np.arange(RING_BITS, dtype=np.uint32)).sum(axis=1).astype(np.uint32)


def encode_masked(v: np.ndarray) -> bytes:
    """Wire form of a masked vector: ``MAGIC | u8 ring bits | u32 k | packed | u32 CRC-32``."""
    body = MAGIC + struct.pack("<BI", RING_BITS, v.size) + pack(v)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_masked(payload: bytes, k: int) -> np.ndarray:
    """Inverse of :func:`encode_masked`; refuses anything but ``k`` ring elements of this build's ring."""
    if len(payload) < 13 or payload[:4] != MAGIC:
        raise SecAggError("not a masked update (bad magic or truncated)")
    if zlib.crc32(payload[:-4]) != struct.unpack_from("<I", payload, len(payload) - 4)[0]:
        raise SecAggError("masked update corrupt (CRC mismatch)")
    bits, n = struct.unpack_from("<BI", payload, 4)
    if bits != RING_BITS or n != k:
        raise SecAggError(f"masked update holds {n} values of {bits} bits, expected {k} of {RING_BITS}")
    return unpack(payload[9:-4], k)


# ---------------------------------------------------------------------------------------------- keys
def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)`` as raw 32-byte strings."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()),
            sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


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
    """SHA-256 of a 256-bit secret: binds a dealer to what its shares must rebuild, reveals nothing of it."""
    return hashlib.sha256(b"fedge-secagg-commit" + secret).digest()


# ---------------------------------------------------------------------------------------------- Shamir
def shamir_split(secret: bytes, n: int, t: int, rng: np.random.Generator | None = None) -> list[int]:
    """Shares of ``secret`` at x = 1..n, any ``t`` of which rebuild it (GF(2^521 - 1))."""
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
        raise SecAggError("shares rebuild no 256-bit secret")
    return secret.to_bytes(SEED_BYTES, "big")


# ---------------------------------------------------------------------------------------------- shares
SHARE_LEN = 66  # bytes of one GF(2^521 - 1) element
SEALED_LEN = 12 + SHARE_LEN + 16  # nonce | ciphertext | GCM tag


def _aad(group_id: str, purpose: bytes, dealer: int, holder: int) -> bytes:
    return b"fedge-secagg-share|" + purpose + b"|" + group_id.encode() + _SHARE.pack(dealer, holder)


def seal_share(key: bytes, group_id: str, purpose: bytes, dealer: int, holder: int, share: int) -> bytes:
    """AES-GCM of one share, bound to group, purpose (``b"b"``: self-mask seed, ``b"s"``: mask key), dealer and
    holder: the server relays it and cannot read it, move it to another holder, group or purpose."""
    import os

    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, share.to_bytes(SHARE_LEN, "big"),
                                       _aad(group_id, purpose, dealer, holder))


def open_share(key: bytes, group_id: str, purpose: bytes, dealer: int, holder: int, sealed: bytes) -> int:
    """Inverse of :func:`seal_share`; :class:`SecAggError` when it was not sealed for this holder."""
    from cryptography.exceptions import InvalidTag

    if len(sealed) != SEALED_LEN:
        raise SecAggError(f"sealed share of {len(sealed)} bytes, expected {SEALED_LEN}")
    try:
        plain = AESGCM(key).decrypt(sealed[:12], sealed[12:], _aad(group_id, purpose, dealer, holder))
    except InvalidTag:
        raise SecAggError(f"share from member {dealer} does not open (wrong key or tampered)") from None
    return int.from_bytes(plain, "big")


def _seal_all(secret: bytes, c_sk: bytes, c_pks: Sequence[bytes], group_id: str, purpose: bytes, dealer: int,
              t: int) -> tuple[bytes, ...]:
    shares = shamir_split(secret, len(c_pks), t)
    return tuple(seal_share(share_key(c_sk, pk, group_id), group_id, purpose, dealer, h, shares[h])
                 for h, pk in enumerate(c_pks))


# ---------------------------------------------------------------------------------------------- masking
def pair_sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def mask(q: np.ndarray, *, b_seed: bytes, pair_seeds: Mapping[int, bytes], index: int) -> np.ndarray:
    """``q + PRG(b) + sum_j sign(index, j) PRG(s_ij)`` in the ring (uint32); ``q`` signed integers."""
    v = ring_add(to_ring(q), prg(b_seed, q.size))
    for j, seed in sorted(pair_seeds.items()):
        v = ring_add(v, prg(seed, q.size), pair_sign(index, j))
    return v


def unmask_sum(masked: Mapping[int, np.ndarray], *, b_seeds: Mapping[int, bytes],
               dropped_pairs: Mapping[tuple[int, int], bytes]) -> np.ndarray:
    """The signed sum of the senders' quantised vectors.

    ``masked``: sender index -> its masked vector; ``b_seeds``: each sender's rebuilt self-mask seed;
    ``dropped_pairs``: ``(sender i, non-sender j) -> s_ij`` (rebuilt from ``j``'s shared key).
    """
    if not masked:
        raise SecAggError("no masked vectors to sum")
    k = next(iter(masked.values())).size
    total = np.zeros(k, np.uint32)
    for i, v in masked.items():
        total = ring_add(total, v)
        total = ring_add(total, prg(b_seeds[i], k), -1)
    for (i, j), seed in dropped_pairs.items():
        total = ring_add(total, prg(seed, k), -pair_sign(i, j))
    return from_ring(total)


def in_range(total: np.ndarray, senders: int, q: Quantizer) -> bool:
    """Whether an unmasked sum is one ``senders`` honest values can make (a wrong mask lands uniformly)."""
    return bool(np.all(np.abs(total) <= senders * q.q_max))


def pairwise_seed(s_private: bytes, peer_s_public: bytes, group_id: str) -> bytes:
    return agree(s_private, peer_s_public, b"mask|" + group_id.encode())


def share_key(c_private: bytes, peer_c_public: bytes, group_id: str) -> bytes:
    return agree(c_private, peer_c_public, b"share|" + group_id.encode())


def scatter(idx: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[idx] = values
    return out


def flatten(delta: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
    """All tensors (sorted by name) as one float32 vector, and the layout to undo it."""
    names = sorted(delta)
    layout = [(k, tuple(int(d) for d in np.shape(delta[k]))) for k in names]
    flat = np.concatenate([np.asarray(delta[k], np.float32).ravel() for k in names]) if names else np.zeros(0)
    return flat.astype(np.float32), layout


def unflatten(flat: np.ndarray, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[pos : pos + size].reshape(shape).astype(np.float32)
        pos += size
    return out


# ---------------------------------------------------------------------------------------------- protocol
# Per group, over three messages to each member and one answer from each holder:
#   keys   (server -> member: roster's long-term c keys)  -> s_pk, sealed shares of s_sk, commitment of s_sk
#   train  (server -> member: GroupSpec)                  -> masked update, sealed shares of b, commitment of b
#   unmask (server -> holder: senders, dropped, sealed)   -> b shares of senders, s shares of dropped members
@dataclass(frozen=True)
class KeyShares:
    """A member's answer to the key round: its mask-agreement public key and its key's sealed shares."""

    s_pk: bytes
    sealed_s: tuple[bytes, ...]  # holder index -> sealed share of s_sk
    commit_s: bytes


@dataclass(frozen=True)
class GroupSpec:
    """What every member of a group is told before it masks: the roster's keys, threshold and quantiser."""

    group_id: str
    c_pks: tuple[bytes, ...]  # member index -> long-term share-encryption public key
    s_pks: tuple[bytes, ...]  # member index -> this group's mask-agreement public key
    t: int
    n: int  # coordinates of the whole update
    k: int  # coordinates kept (the group's shared index set)
    clip: float
    kept: bytes = b""  # the index set as sorted little-endian uint32 (b"": random from the group id)
    sketch_top: int = 0  # > 0: the k values are a count sketch of the whole update; the sum keeps its top ones

    @property
    def size(self) -> int:
        return len(self.s_pks)

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, k=self.k, group=self.size)

    def indices(self) -> np.ndarray:
        if not self.kept:
            return index_set(b"fedge-secagg-index|" + self.group_id.encode(), self.n, self.k)
        idx = np.frombuffer(self.kept, dtype="<u4").astype(np.int64)
        if idx.size != self.k or (idx.size and (idx[-1] >= self.n or np.any(np.diff(idx) <= 0))):
            raise SecAggError(f"index set of {idx.size} coordinates is not {self.k} sorted ones below {self.n}")
        return idx



SKETCH_ROWS = 3  # count-sketch rows: a coordinate's estimate is the median of its rows (one row cannot tell
# a heavy coordinate from the others in its bucket)


def sketch_hash(group_id: str, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The group's count sketch (public, from the group id): ``(rows, n)`` cell index into ``[0, m)`` (row ``r``
    in its own ``m // rows`` cells) and ``(rows, n)`` signs."""
    rows = SKETCH_ROWS if m >= SKETCH_ROWS else 1
    width = m // rows
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(
        hashlib.sha256(b"fedge-secagg-sketch|" + group_id.encode()).digest()[:16], "little")))
    h = rng.integers(0, width, size=(rows, n)) + (np.arange(rows) * width)[:, None]
    return h.astype(np.int64), np.where(rng.random((rows, n)) < 0.5, -1.0, 1.0).astype(np.float32)


def sketch(flat: np.ndarray, h: np.ndarray, sgn: np.ndarray, m: int) -> np.ndarray:
    """Count sketch of a vector: ``cells[h[r, j]] += sgn[r, j] x[j]`` for every row ``r`` (linear, so the sum of
    sketches is the sketch of the sum and masking leaves it intact)."""
    w = (sgn.astype(np.float64) * np.asarray(flat, np.float64)[None, :]).ravel()
    return np.bincount(h.ravel(), weights=w, minlength=m).astype(np.float32)


def unsketch_topk(cells: np.ndarray, h: np.ndarray, sgn: np.ndarray, top: int) -> np.ndarray:
    """The ``top`` largest coordinate estimates (median over rows of ``sgn cells[h]``), zeros elsewhere."""
    est = np.median(sgn * np.asarray(cells, np.float32)[h], axis=0).astype(np.float32)  # (n,)
    if not 0 < top < est.size:
        return est
    out = np.zeros(est.size, np.float32)
    keep = np.argpartition(-np.abs(est), top - 1)[:top]
    out[keep] = est[keep]
    return out


@dataclass(frozen=True)
class MaskedUpdate:
    """A member's upload: the masked vector, one sealed self-mask share per member, and the commitment."""

    payload: bytes
    sealed_b: tuple[bytes, ...]  # holder index -> sealed share of b
    commit_b: bytes


def member_keys(group_id: str, index: int, c_sk: bytes, c_pks: Sequence[bytes], t: int
                ) -> tuple[bytes, KeyShares]:
    """Key round: a fresh mask key for the group, its shares sealed to every member; returns ``(s_sk, answer)``."""
    if not 0 <= index < len(c_pks):
        raise SecAggError(f"member index {index} outside a roster of {len(c_pks)}")
    s_sk, s_pk = new_keypair()
    return s_sk, KeyShares(s_pk, _seal_all(s_sk, c_sk, c_pks, group_id, b"s", index, t), commitment(s_sk))


def member_mask(flat: np.ndarray, spec: GroupSpec, index: int, c_sk: bytes, s_sk: bytes,
                rng: np.random.Generator) -> tuple[MaskedUpdate, np.ndarray]:
    """Mask a member's clipped flat update; return the upload and what it sent in float (error feedback).

    ``flat`` is the whole update (``n`` float values, already clipped to ``spec.clip``): only the group's
    index set is kept, quantised stochastically.
    """
    import os

    if flat.size != spec.n:
        raise SecAggError(f"update of {flat.size} values, group expects {spec.n}")
    q = spec.quantizer
    if spec.sketch_top:
        h, sgn = sketch_hash(spec.group_id, spec.n, spec.k)
        qv = q.quantize(sketch(flat, h, sgn, spec.k), rng)
    else:
        qv = q.quantize(flat[spec.indices()], rng)
    b_seed = os.urandom(SEED_BYTES)
    pairs = {j: pairwise_seed(s_sk, pk, spec.group_id) for j, pk in enumerate(spec.s_pks) if j != index}
    v = mask(qv, b_seed=b_seed, pair_seeds=pairs, index=index)
    sealed = _seal_all(b_seed, c_sk, spec.c_pks, spec.group_id, b"b", index, spec.t)
    return MaskedUpdate(encode_masked(v), sealed, commitment(b_seed)), expand(spec, q.dequantize(qv))


def expand(spec: GroupSpec, values: np.ndarray) -> np.ndarray:
    """The ``n``-vector ``k`` sent values stand for: scattered on the index set, or the sketch's top estimates."""
    if spec.sketch_top:
        h, sgn = sketch_hash(spec.group_id, spec.n, spec.k)
        return unsketch_topk(values, h, sgn, spec.sketch_top)
    return scatter(spec.indices(), values, spec.n)


def member_reveal(spec: GroupSpec, index: int, c_sk: bytes, sealed_b: Mapping[int, bytes],
                  sealed_s: Mapping[int, bytes], senders: Sequence[int], dropped: Sequence[int]
                  ) -> tuple[dict[int, int], dict[int, int]]:
    """A holder's answer to the unmasking: its ``b`` share of every sender, ``s`` share of every dropped one.

    ``sealed_b`` / ``sealed_s``: dealer index -> the share the dealer sealed for this holder (relayed by the
    server). Refuses (:class:`SecAggError`) a request naming a member both sender and dropped (both secrets
    of one member unmask its update alone) or with fewer than :data:`MIN_GROUP` senders.
    """
    if set(senders) & set(dropped):
        raise SecAggError(f"members {sorted(set(senders) & set(dropped))} named both sender and dropped")
    if len(set(senders)) < MIN_GROUP:
        raise SecAggError(f"{len(set(senders))} sender(s): a sum of fewer than {MIN_GROUP} is an update alone")
    b_out = {i: open_share(share_key(c_sk, spec.c_pks[i], spec.group_id), spec.group_id, b"b", i, index,
                           sealed_b[i]) for i in senders}
    s_out = {j: open_share(share_key(c_sk, spec.c_pks[j], spec.group_id), spec.group_id, b"s", j, index,
                           sealed_s[j]) for j in dropped}
    return b_out, s_out


def server_unmask(spec: GroupSpec, commits_s: Sequence[bytes], uploads: Mapping[int, MaskedUpdate],
                  answers: Mapping[int, tuple[Mapping[int, int], Mapping[int, int]]]) -> np.ndarray:
    """The float sum of the senders' updates (length ``n``) from their uploads and the holders' answers.

    ``answers``: holder index -> (``b`` shares by sender, ``s`` shares by dropped member). Every secret is
    rebuilt from the shares (all answers must agree) and checked against its dealer's commitment, then the
    sum must lie in the range honest values make. Raises :class:`SecAggError` (the group is discarded) when
    fewer than ``t`` holders answered, a share is inconsistent, a rebuilt secret misses its commitment, or
    the sum is out of range (a member masked with something else than what it shared).
    """
    senders = sorted(uploads)
    if len(senders) < MIN_GROUP:
        raise SecAggError(f"{len(senders)} sender(s) in the group: never unmasked alone")
    dropped = [j for j in range(spec.size) if j not in uploads]
    if len(answers) < spec.t:
        raise SecAggError(f"{len(answers)} holders answered, {spec.t} needed")
    masked = {i: decode_masked(uploads[i].payload, spec.k) for i in senders}
    b_seeds: dict[int, bytes] = {}
    for i in senders:
        b = shamir_combine({h + 1: a[0][i] for h, a in answers.items() if i in a[0]}, spec.t)
        if commitment(b) != uploads[i].commit_b:
            raise SecAggError(f"member {i}'s self-mask shares do not rebuild its committed seed")
        b_seeds[i] = b
    pairs: dict[tuple[int, int], bytes] = {}
    for j in dropped:
        s_sk = shamir_combine({h + 1: a[1][j] for h, a in answers.items() if j in a[1]}, spec.t)
        if commitment(s_sk) != commits_s[j]:
            raise SecAggError(f"member {j}'s key shares do not rebuild its committed key")
        for i in senders:
            pairs[(i, j)] = pairwise_seed(s_sk, spec.s_pks[i], spec.group_id)
    total = unmask_sum(masked, b_seeds=b_seeds, dropped_pairs=pairs)
    q = spec.quantizer
    if not in_range(total, len(senders), q):
        raise SecAggError("unmasked sum out of range: a member masked with something else than it shared")
    return expand(spec, q.dequantize(total))
