"""The vector a secure-aggregation group masks (:mod:`fedge.common.secagg`): an update's tensors flattened to
one float vector and back, the group's shared index set, and the count sketch that can stand in for it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.common.secagg_ring import SecAggError

__all__ = ["SKETCH_ROWS", "flatten", "index_set", "scatter", "sketch", "sketch_hash", "unflatten", "unsketch_topk"]


def index_set(seed: bytes, n: int, k: int) -> np.ndarray:
    """The group's ``k`` coordinates out of ``n`` (sorted): random from the public group seed, same for all."""
    if not 0 < k <= n:
        raise SecAggError(f"cannot keep {k} of {n} coordinates")
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(hashlib.sha256(seed).digest()[:16], "little")))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


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
