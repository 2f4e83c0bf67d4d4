"""Secure aggregation's ring arithmetic and masking (:mod:`fedge.common.secagg`): pure functions.

Values live mod ``2^bits`` in ``uint32``, ``bits`` the smallest ring in which the sum of a whole group's
values cannot wrap (:attr:`Quantizer.bits`): a member's clipped update is quantised stochastically to a few
levels (:class:`Quantizer`), masked with AES-CTR pseudo-random streams (its self mask and the pairwise masks
that cancel in the group's sum), packed at ``bits`` bits a value for the wire, and unmasked once the seeds
are rebuilt. At least one ring value is left out of an honest sum's range, so a garbage mask lands out of
range on some of thousands of coordinates and is caught.
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
    "MAGIC",
    "MAX_RING_BITS",
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

MAX_RING_BITS = 24  # the widest ring a group may use (values and sums held in uint32)
MAGIC = b"FDG2"


class SecAggError(ValueError):
    """A masked payload, share or key is malformed, or a reconstruction is inconsistent."""


# ---------------------------------------------------------------------------------------------- quantiser
@dataclass(frozen=True)
class Quantizer:
    """Clip-and-quantise into the ring: ``k`` kept coordinates, group size ``group``, L2 clip ``clip``,
    ``levels`` quantisation levels per side.

    Each coordinate is clipped to ``[-r, r]`` with ``r = 4 clip / sqrt(k)`` (four times the coordinate of a
    norm-``clip`` vector spread evenly; what a device clips goes to its error feedback) and rounded
    stochastically (unbiased) to one of ``2 levels + 1`` values; ``levels = 1`` is ternary. The ring is the
    smallest power of two that holds the sum of ``group`` such values with one value to spare.
    """

    clip: float
    k: int
    group: int
    levels: int = 1

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.k < 1 or self.group < 1 or self.levels < 1:
            raise SecAggError(f"bad quantizer clip={self.clip} k={self.k} group={self.group} levels={self.levels}")
        if self.bits > MAX_RING_BITS:
            raise SecAggError(f"a group of {self.group} at {self.levels} levels needs a {self.bits}-bit ring "
                              f"(at most {MAX_RING_BITS})")

    @property
    def r(self) -> float:
        return 4.0 * self.clip / math.sqrt(self.k)

    @property
    def q_max(self) -> int:
        return self.levels

    @property
    def bits(self) -> int:
        """Ring bits: ``2^bits > 2 group levels + 1`` (every honest sum fits, one value never occurs)."""
        return max(2, (2 * self.group * self.levels + 1).bit_length())

    @staticmethod
    def largest_group(bits: int, levels: int = 1) -> int:
        """The most members whose sum still fits a ``bits``-bit ring at ``levels`` (the inverse of :attr:`bits`)."""
        return ((1 << bits) - 2) // (2 * levels)

    def quantize(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stochastic rounding of ``clip(x, -r, r) / r * levels`` (unbiased inside the range); int64."""
        z = np.clip(np.asarray(x, np.float64), -self.r, self.r) / self.r * self.levels
        lo = np.floor(z)
        return (lo + (rng.random(z.shape) < (z - lo))).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, np.float64) * (self.r / self.levels)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- ring
def prg(seed: bytes, k: int, bits: int) -> np.ndarray:
    """``k`` elements of the ``2^bits`` ring from AES-128-CTR keyed by ``seed`` (uint32)."""
    key = hashlib.sha256(b"fedge-secagg-prg" + seed).digest()[:16]
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(b"\0" * (4 * k)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4") & np.uint32((1 << bits) - 1)


def to_ring(q: np.ndarray, bits: int) -> np.ndarray:
    return (np.asarray(q, np.int64) % (1 << bits)).astype(np.uint32)


def from_ring(v: np.ndarray, bits: int) -> np.ndarray:
    """Centered lift: ring elements -> signed integers in ``[-2^(bits-1), 2^(bits-1))``."""
    x = np.asarray(v, np.int64) % (1 << bits)
    return np.where(x >= 1 << (bits - 1), x - (1 << bits), x)


def ring_add(a: np.ndarray, b: np.ndarray, bits: int, sign: int = 1) -> np.ndarray:
    m = np.uint32((1 << bits) - 1)
    return ((a.astype(np.uint32) + (b.astype(np.uint32) if sign > 0 else (~b.astype(np.uint32) + 1))) & m)


def pack(v: np.ndarray, bits: int) -> bytes:
    """Ring elements -> ``bits`` bits each, little-endian bit order, padded to a byte."""
    b = ((np.asarray(v, np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little").tobytes()


def unpack(buf: bytes, k: int, bits: int) -> np.ndarray:
    need = (k * bits + 7) // 8
    if len(buf) != need:
        raise SecAggError(f"masked vector of {len(buf)} bytes, expected {need} for {k} values")
    b = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: k * bits].reshape(k, bits)
    return (b.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1).astype(np.uint32)


def encode_masked(v: np.ndarray, bits: int) -> bytes:
    """Wire form of a masked vector: ``MAGIC | u8 ring bits | u32 k | packed | u32 CRC-32``."""
    body = MAGIC + struct.pack("<BI", bits, v.size) + pack(v, bits)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_masked(payload: bytes, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_masked`; refuses anything but ``k`` elements of the group's ``2^bits`` ring."""
    if len(payload) < 13 or payload[:4] != MAGIC:
        raise SecAggError("not a masked update (bad magic or truncated)")
    if zlib.crc32(payload[:-4]) != struct.unpack_from("<I", payload, len(payload) - 4)[0]:
        raise SecAggError("masked update corrupt (CRC mismatch)")
    got, n = struct.unpack_from("<BI", payload, 4)
    if got != bits or n != k:
        raise SecAggError(f"masked update holds {n} values of {got} bits, expected {k} of {bits}")
    return unpack(payload[9:-4], k, bits)


# ---------------------------------------------------------------------------------------------- masking
def pair_sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def mask(q: np.ndarray, *, b_seed: bytes, pair_seeds: Mapping[int, bytes], index: int, bits: int) -> np.ndarray:
    """``q + PRG(b) + sum_j sign(index, j) PRG(s_ij)`` in the ``2^bits`` ring (uint32); ``q`` signed integers."""
    v = ring_add(to_ring(q, bits), prg(b_seed, q.size, bits), bits)
    for j, seed in sorted(pair_seeds.items()):
        v = ring_add(v, prg(seed, q.size, bits), bits, pair_sign(index, j))
    return v


def unmask_sum(masked: Mapping[int, np.ndarray], *, b_seeds: Mapping[int, bytes],
               dropped_pairs: Mapping[tuple[int, int], bytes], bits: int) -> np.ndarray:
    """The signed sum of the senders' quantised vectors.

    ``masked``: sender index -> its masked vector; ``b_seeds``: each sender's rebuilt self-mask seed;
    ``dropped_pairs``: ``(sender i, non-sender j) -> s_ij`` (rebuilt from ``j``'s shared key).
    """
    if not masked:
        raise SecAggError("no masked vectors to sum")
    k = next(iter(masked.values())).size
    total = np.zeros(k, np.uint32)
    for i, v in masked.items():
        total = ring_add(total, v, bits)
        total = ring_add(total, prg(b_seeds[i], k, bits), bits, -1)
    for (i, j), seed in dropped_pairs.items():
        total = ring_add(total, prg(seed, k, bits), bits, -pair_sign(i, j))
    return from_ring(total, bits)


def in_range(total: np.ndarray, senders: int, q: Quantizer) -> bool:
    """Whether an unmasked sum is one ``senders`` honest values can make (a wrong mask lands uniformly)."""
    return bool(np.all(np.abs(total) <= senders * q.q_max))
