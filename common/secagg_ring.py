"""Secure aggregation's ring arithmetic and masking (:mod:`fedge.common.secagg`): pure functions.

Values live mod ``2^RING_BITS`` in ``uint32``: a member's clipped update is quantised stochastically
(:class:`Quantizer`, leaving ``HEADROOM_BITS`` unused so an honest sum never wraps), masked with AES-CTR
pseudo-random streams (its self mask and the pairwise masks that cancel in the group's sum), packed at
``RING_BITS`` bits a value for the wire, and unmasked once the seeds are rebuilt.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "HEADROOM_BITS",
    "MAGIC",
    "RING_BITS",
    "Quantizer",
    "SecAggError",
    "decode_masked",
    "encode_masked",
    "from_ring",
    "in_range",
    "mask",
    "pack",
    "pair_sign",
    "prg",
    "ring_add",
    "to_ring",
    "unmask_sum",
    "unpack",
]

RING_BITS = 20  # masked values travel as 20-bit ring elements (2.5 bytes each)
HEADROOM_BITS = 4  # an honest group sum uses at most 2^(RING_BITS - HEADROOM_BITS - 1) levels either way
MAGIC = b"FDGS"


class SecAggError(ValueError):
    """A masked payload, share or key is malformed, or a reconstruction is inconsistent."""


# ---------------------------------------------------------------------------------------------- quantiser
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
