"""Defences of the aggregator against what a client can lie about: example counts, norms, outliers, replays.

The server cannot verify a client's claimed ``num-examples`` nor that its delta came from honest training;
what it can see is how one update compares with the others. Every rule here is therefore relative to the
recently accepted updates (a window that spans versions, so it works at a small buffer size ``K``):

* :func:`capped_examples`: the weight of an update is ``min(claimed, factor x median of recent claims)``
  (and an absolute cap when one is configured): a claim of ``1e12`` weighs like an ordinary device.
* :func:`norm_bound`: an update is clipped to ``factor x median of recent accepted norms`` once ``warmup``
  norms are known (before that only the absolute ``max_norm`` applies).
* :func:`cosine_to_reference`: each buffered update's cosine with the mean of the buffer and the window (the
  direction the federation has been moving in; norms are bounded first, so a minority cannot turn it round); an
  update pointing away from it (a sign flip) is left out of the version. Not the coordinate-wise median: top-k
  sparsified updates mostly hold different coordinates, and their median is about zero.
* :func:`outlier_scores`: a Krum-style score (mean squared distance to the nearest neighbours among the
  buffer and the window of recent updates, over the median of those scores); a buffered update scoring
  above a threshold is left out of the version.
* :class:`ReplayGuard`: digests of the last accepted payloads; the same bytes twice are a replay.

Pure: arrays and numbers in, numbers out; no Flower, no Ray, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ReplayGuard", "capped_examples", "cosine_to_reference", "norm_bound", "outlier_scores", "payload_digest"]


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if len(values) else math.nan


def capped_examples(claimed: Sequence[float], recent: Sequence[float], *, factor: float,
                    max_examples: float = 0.0) -> list[float]:
    """Example weights the server trusts: each claim capped by ``factor`` x the median of all known claims.

    ``recent`` are claims of earlier accepted updates; the median also counts ``claimed`` (the buffer), so the
    very first buffer is protected too. ``factor <= 0`` turns the relative cap off; ``max_examples > 0`` is
    an absolute cap on top.
    """
    out = [float(c) for c in claimed]
    if factor > 0 and out:
        cap = factor * _median([*recent, *out])
        out = [min(c, cap) for c in out]
    if max_examples > 0:
        out = [min(c, max_examples) for c in out]
    return out


def norm_bound(recent_norms: Sequence[float], *, factor: float, warmup: int, max_norm: float) -> float:
    """The norm an update may have: ``min(max_norm, factor x median(recent_norms))`` after the warm-up."""
    if factor <= 0 or len(recent_norms) < max(warmup, 1):
        return max_norm
    return min(max_norm, factor * _median(recent_norms))


def _flat(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in sorted(delta)])


def outlier_scores(buffer: Sequence[Mapping[str, np.ndarray]],
                   window: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Krum-style score of each buffered delta, relative to the others: ``(N,)``, about 1 for a typical update.

    A delta's raw score is its mean squared distance to its ``m = max(1, (M - 1) // 2)`` nearest neighbours
    among the ``M`` deltas of ``buffer`` + ``window`` (Blanchard et al., 2017 take the ``M - f - 2`` nearest;
    half of them tolerates any minority). Scores are divided by the median raw score over all ``M``, so a
    threshold means "so many times a typical update's spread" whatever the scale of the updates.
    """
    pts = [_flat(d) for d in [*buffer, *window]]
    m_all = len(pts)
    if m_all < 3:
        return np.ones(len(buffer))
    x = np.stack(pts)  # (M, P)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)  # (M, M)
    np.fill_diagonal(d2, np.inf)
    m = max(1, (m_all - 1) // 2)
    raw = np.sort(d2, axis=1)[:, :m].mean(axis=1)  # (M,)
    ref = float(np.median(raw))
    if not ref > 0:
        return np.ones(len(buffer))
    return raw[: len(buffer)] / ref


def cosine_to_reference(buffer: Sequence[Mapping[str, np.ndarray]],
                        window: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """Cosine of each buffered delta with the mean of ``buffer`` + ``window``: ``(N,)``."""
    x = np.stack([_flat(d) for d in [*buffer, *window]])  # (M, P)
    ref = x.mean(axis=0)  # (P,)
    xb = x[: len(buffer)]
    norms = np.linalg.norm(xb, axis=1) * np.linalg.norm(ref)
    return np.where(norms > 0, xb @ ref / np.where(norms > 0, norms, 1.0), 0.0)


def payload_digest(payload: bytes) -> str:
    """The replay key of a payload."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class ReplayGuard:
    """Digests of the last ``capacity`` accepted payloads (bounded memory: the oldest is forgotten first)."""

    def __init__(self, capacity: int = 4096, digests: Sequence[str] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        for d in digests:
            self.add(d)

    def __contains__(self, digest: object) -> bool:
        return digest in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, digest: str) -> None:
        self._seen[digest] = None
        self._seen.move_to_end(digest)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def digests(self) -> list[str]:
        """Oldest first (what a checkpoint keeps)."""
        return list(self._seen)
