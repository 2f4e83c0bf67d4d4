"""Adapter-delta codec: top-k sparsification + int8 / 4-bit quantization, client-side error feedback.

Wire format (little endian), self-describing and checked end to end::

    magic b"FDGC" | u8 format version | u32 header length | header (UTF-8 JSON) | payload | u32 CRC-32

The header (zlib-compressed JSON) gives the quantization bits, element and kept counts, section lengths and,
per tensor, name, shape, dtype, kept count and scale. Indices of kept elements (global top-k over all
tensors) are delta-encoded as LEB128 varints (about one byte each at 5-10 % density); values are symmetric
per-tensor quantized. :func:`decode` refuses anything
that is not exactly that: bad magic, unknown version, bad header, lengths that do not add up, a CRC
mismatch, indices out of range, non-finite scales or values. Pure NumPy.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_ELEMENTS",
    "MAX_HEADER_BYTES",
    "CodecError",
    "CodecParams",
    "LayoutError",
    "decode",
    "encode",
    "raw_nbytes",
]

MAGIC = b"FDGC"
FORMAT_VERSION = 1
_DTYPES = ("float32", "float16", "float64")
MAX_HEADER_BYTES = 1 << 24
MAX_ELEMENTS = 1 << 31


class CodecError(ValueError):
    """A payload is corrupt, truncated, of an unknown version, or holds non-finite values."""


class LayoutError(CodecError):
    """A payload's declared tensors differ from the layout the reader expects (``field``: "keys" or "shape")."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field


@dataclass(frozen=True)
class CodecParams:
    """How to encode: ``topk_ratio`` of elements kept (1.0 = dense), ``bits`` in {4, 8, 32}."""

    topk_ratio: float = 0.05
    bits: int = 8
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.bits not in (4, 8, 32):
            raise ValueError(f"bits must be 4, 8 or 32, got {self.bits}")


# ---------------------------------------------------------------------------------------------- varints
def _varint_encode(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers (vectorised)."""
    v = values.astype(np.uint64)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for shift in (7, 14, 21, 28, 35):
        nbytes += v >= (np.uint64(1) << np.uint64(shift))
    total = int(nbytes.sum())
    out = np.empty(total, dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for i in range(int(nbytes.max(initial=0))):
        live = nbytes > i
        byte = (v[live] >> np.uint64(7 * i)) & np.uint64(0x7F)
        more = (nbytes[live] > i + 1).astype(np.uint64) << np.uint64(7)
        out[starts[live] + i] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(buf: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`_varint_encode`; raises CodecError unless exactly ``count`` values fill ``buf``."""
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero((b & 0x80) == 0)
    if ends.size != count or (count and ends[-1] != b.size - 1) or (count == 0 and b.size):
        raise CodecError("index stream is malformed")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 6:
        raise CodecError("index varint too long")
    vals = np.zeros(count, dtype=np.uint64)
    for i in range(int(lengths.max())):
        live = lengths > i
        vals[live] |= (b[starts[live] + i] & 0x7F).astype(np.uint64) << np.uint64(7 * i)
    return vals.astype(np.int64)


# ---------------------------------------------------------------------------------------------- quant
def _quantize(x: np.ndarray, bits: int) -> tuple[bytes, float]:
    if bits == 32:
        return x.astype("<f4").tobytes(), 1.0
    qmax = 127 if bits == 8 else 7
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = amax / qmax if amax > 0 else 1.0
    q = np.clip(np.rint(x / scale), -qmax, qmax).astype(np.int8)
    if bits == 8:
        return q.tobytes(), scale
    u = (q + 8).astype(np.uint8)  # 1..15
    if u.size % 2:
        u = np.concatenate([u, np.array([8], dtype=np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes(), scale


def _dequantize(buf: bytes, n: int, bits: int, scale: float) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(buf, dtype="<f4", count=n).astype(np.float32)
    if bits == 8:
        return np.frombuffer(buf, dtype=np.int8, count=n).astype(np.float32) * np.float32(scale)
    u = np.frombuffer(buf, dtype=np.uint8)
    q = np.empty(u.size * 2, dtype=np.int16)
    q[0::2], q[1::2] = u & 0x0F, u >> 4
    return (q[:n] - 8).astype(np.float32) * np.float32(scale)


def _value_bytes(n: int, bits: int) -> int:
    return n * 4 if bits == 32 else n if bits == 8 else (n + 1) // 2


# ---------------------------------------------------------------------------------------------- API
def encode(
    delta: dict[str, np.ndarray],
    params: CodecParams,
    residual: dict[str, np.ndarray] | None = None,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """Compress an adapter delta; return the payload and the new error-feedback residual.

    All tensors (sorted by name) are viewed as one vector; the top ``topk_ratio`` of its entries by
    magnitude are kept (global top-k: where the update is large, across tensors), each tensor's kept values
    quantized with its own scale. With error feedback the residual (what compression lost last time) is
    added to ``delta`` first, and the new residual is ``(delta + residual) - decode(payload)``; without it
    the returned residual is zeros. Raises :class:`CodecError` on a non-finite input: a NaN is never sent.
    """
    names = sorted(delta)
    flats, shapes, dtypes = [], [], []
    for name in names:
        x = np.asarray(delta[name])
        if x.dtype.name not in _DTYPES:
            raise CodecError(f"tensor {name!r}: unsupported dtype {x.dtype}")
        f = x.astype(np.float32).ravel()
        if params.error_feedback and residual is not None and name in residual:
            r = np.asarray(residual[name], dtype=np.float32).ravel()
            if r.shape != f.shape:
                raise CodecError(f"residual {name!r}: shape {r.shape} != {f.shape}")
            f = f + r
        if not np.all(np.isfinite(f)):
            raise CodecError(f"tensor {name!r} holds non-finite values; refusing to encode")
        flats.append(f)
        shapes.append(list(x.shape))
        dtypes.append(x.dtype.name)
    flat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    offsets = np.concatenate([[0], np.cumsum([f.size for f in flats])]).astype(np.int64)
    n = flat.size
    k = n if params.topk_ratio >= 1.0 else (max(1, round(params.topk_ratio * n)) if n else 0)
    if k < n:
        idx = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]).astype(np.int64)
        gaps = np.diff(idx, prepend=0)
        gaps[1:] -= 1  # gap to the previous kept index minus one: neighbours cost one zero byte
        idx_bytes = _varint_encode(gaps)
    else:
        idx, idx_bytes = np.arange(n, dtype=np.int64), b""
    bounds = np.searchsorted(idx, offsets)  # kept values of tensor t: bounds[t]:bounds[t+1]
    vals = flat[idx]
    vchunks, scales, recon_vals = [], [], np.empty(k, dtype=np.float32)
    for t in range(len(names)):
        seg = vals[bounds[t] : bounds[t + 1]]
        vb, sc = _quantize(seg, params.bits)
        vchunks.append(vb)
        scales.append(sc)
        recon_vals[bounds[t] : bounds[t + 1]] = _dequantize(vb, seg.size, params.bits, sc)
    new_res: dict[str, np.ndarray] = {}
    if params.error_feedback:
        recon = np.zeros(n, dtype=np.float32)
        recon[idx] = recon_vals
        err = flat - recon
    for t, name in enumerate(names):
        new_res[name] = (
            err[offsets[t] : offsets[t + 1]].reshape(shapes[t]) if params.error_feedback
            else np.zeros(shapes[t], dtype=np.float32)
        )
    vbytes = b"".join(vchunks)
    header = {
        "bits": params.bits,
        "n": n,
        "k": k,
        "idx_len": len(idx_bytes),
        "val_len": len(vbytes),
        "tensors": [[nm, sh, dt, int(bounds[t + 1] - bounds[t]), scales[t]]
                    for t, (nm, sh, dt) in enumerate(zip(names, shapes, dtypes))],
    }
    hbytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = MAGIC + struct.pack("<BI", FORMAT_VERSION, len(hbytes)) + hbytes + idx_bytes + vbytes
    return body + struct.pack("<I", zlib.crc32(body)), new_res


def decode(payload: bytes, expected: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Decode a payload from :func:`encode`; raises :class:`CodecError` on anything malformed.

    ``expected`` (tensor name -> shape) is the layout the reader will accept. Give it whenever the payload
    comes from someone else: the declared names and shapes are compared with it before anything is allocated,
    so a few hostile header bytes cannot make the reader allocate what they declare (:class:`LayoutError`).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < 13:
        raise CodecError(f"payload truncated: {len(payload)} bytes")
    if payload[:4] != MAGIC:
        raise CodecError("not a fedge codec payload (bad magic)")
    version, hlen = struct.unpack_from("<BI", payload, 4)
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported codec format version {version} (this build reads {FORMAT_VERSION})")
    (crc,) = struct.unpack_from("<I", payload, len(payload) - 4)
    if zlib.crc32(payload[:-4]) != crc:
        raise CodecError("payload corrupt or truncated (CRC mismatch)")
    if hlen > MAX_HEADER_BYTES or 9 + hlen > len(payload) - 4:
        raise CodecError("header length out of range")
    try:
        raw = zlib.decompressobj().decompress(payload[9 : 9 + hlen], MAX_HEADER_BYTES)
        header = json.loads(raw.decode())
        bits, n, k = int(header["bits"]), int(header["n"]), int(header["k"])
        ilen, vlen = int(header["idx_len"]), int(header["val_len"])
        tensors = [(str(t[0]), [int(s) for s in t[1]], str(t[2]), int(t[3]), float(t[4]))
                   for t in header["tensors"]]
    except Exception as e:  # noqa: BLE001 - any parse failure is the same refusal
        raise CodecError(f"header unreadable: {e}") from None
    if bits not in (4, 8, 32):
        raise CodecError(f"unsupported quantization bits {bits}")
    if not 0 <= k <= n or n > MAX_ELEMENTS:
        raise CodecError(f"kept count {k} out of range for {n} elements")
    sizes = []
    for name, shape, dtype, kt, scale in tensors:
        if dtype not in _DTYPES:
            raise CodecError(f"tensor {name!r}: unsupported dtype {dtype}")
        if any(s < 0 for s in shape):
            raise CodecError(f"tensor {name!r}: negative dimension in {shape}")
        if not np.isfinite(scale) or scale <= 0:
            raise CodecError(f"tensor {name!r}: invalid scale {scale}")
        sizes.append(int(np.prod(shape, dtype=np.int64)))
    if len({t[0] for t in tensors}) != len(tensors):
        raise CodecError("a tensor name appears twice")
    if expected is not None:
        _check_layout(tensors, expected)
    if sum(sizes) != n or sum(t[3] for t in tensors) != k:
        raise CodecError("tensor sizes or kept counts do not add up")
    vlens = [_value_bytes(t[3], bits) for t in tensors]
    if vlen != sum(vlens) or ilen < 0 or 9 + hlen + ilen + vlen != len(payload) - 4:
        raise CodecError("section lengths do not add up")
    pos = 9 + hlen
    ibuf, vbuf = payload[pos : pos + ilen], payload[pos + ilen : pos + ilen + vlen]
    if k < n:
        gaps = _varint_decode(ibuf, k)
        idx = np.cumsum(gaps + 1) - 1
        if k and (idx[-1] >= n or idx[0] < 0):
            raise CodecError("index out of range")
    else:
        if ilen:
            raise CodecError("dense payload carries indices")
        idx = np.arange(n, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    bounds = np.searchsorted(idx, offsets)
    out: dict[str, np.ndarray] = {}
    vpos = 0
    for t, (name, shape, dtype, kt, scale) in enumerate(tensors):
        if bounds[t + 1] - bounds[t] != kt:
            raise CodecError(f"tensor {name!r}: {bounds[t + 1] - bounds[t]} indices for {kt} kept values")
        vals = _dequantize(vbuf[vpos : vpos + vlens[t]], kt, bits, scale)
        vpos += vlens[t]
        if not np.all(np.isfinite(vals)):
            raise CodecError(f"tensor {name!r} holds non-finite values")
        flat = np.zeros(sizes[t], dtype=np.float32)
        flat[idx[bounds[t] : bounds[t + 1]] - offsets[t]] = vals
        out[name] = flat.reshape(shape).astype(dtype)
    return out


def _check_layout(tensors: list[tuple[str, list[int], str, int, float]],
                  expected: Mapping[str, Sequence[int]]) -> None:
    names = {t[0] for t in tensors}
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise LayoutError("keys", f"missing={missing[:3]} unexpected={extra[:3]}")
    for name, shape, *_ in tensors:
        if tuple(shape) != tuple(int(d) for d in expected[name]):
            raise LayoutError("shape", f"{name!r}: {tuple(shape)} != {tuple(expected[name])}")


def raw_nbytes(delta: dict[str, np.ndarray]) -> int:
    """Size of the delta as dense float32 (the baseline a compression ratio is measured against)."""
    return sum(int(np.asarray(v).size) * 4 for v in delta.values())
