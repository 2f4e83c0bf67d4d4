"""The vector a secure-aggregation group masks (:mod:`fedge.common.secagg`): an update's tensors flattened to
one float vector and back, and the group's shared index set."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.common.secagg_ring import SecAggError

__all__ = ["flatten", "index_set", "scatter", "unflatten"]


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
