"""Client-side differential privacy, pure numerics: clip an update, add Gaussian noise, account epsilon.

The mechanism (applied by :func:`fedge.edge.mods.dp_mod` to every update a device sends): scale the whole adapter
delta so its L2 norm is at most ``C`` (``clip``), then add i.i.d. ``N(0, (z*C)^2)`` to every coordinate
(``z`` = ``noise_multiplier``). Changing *everything* on the device (its whole local data set) moves a clipped
update by at most ``2C`` in L2, so one release is the Gaussian mechanism with sensitivity ``2C`` and noise
``z*C``; ``T`` releases compose to ``mu``-Gaussian DP with ``mu = 2*sqrt(T)/z`` (Dong, Roth & Su 2019), whose
exact ``(epsilon, delta)`` curve (Balle & Wang 2018) :func:`gaussian_epsilon` inverts. No sampling amplification
is claimed: the server, not the device, chooses when the device takes part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy.special import log_ndtr, ndtr

__all__ = ["REPLACE_SENSITIVITY", "add_gaussian_noise", "clip_update", "gaussian_epsilon", "gdp_delta", "l2_norm"]

# Any two local data sets of one device give clipped updates at most 2C apart ("replace-one" at device level).
REPLACE_SENSITIVITY = 2.0


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors viewed as one vector."""
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in arrays.values())))


def clip_update(delta: Mapping[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``delta`` by ``min(1, clip / ||delta||)``; return the clipped delta and the norm before clipping."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = l2_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, dtype=np.float32) * np.float32(factor)) for k, v in delta.items()}, norm


def add_gaussian_noise(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
                       ) -> dict[str, np.ndarray]:
    """``delta + N(0, std^2)`` element-wise (float32)."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return {k: (np.asarray(v, dtype=np.float32) + rng.normal(0.0, std, size=np.shape(v)).astype(np.float32))
            for k, v in delta.items()}


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism: ``Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)``."""
    if mu <= 0:
        return 0.0
    a = -epsilon / mu + mu / 2
    b = -epsilon / mu - mu / 2
    return float(max(0.0, ndtr(a) - math.exp(epsilon + float(log_ndtr(b)))))


def gaussian_epsilon(releases: int, noise_multiplier: float, delta: float,
                     sensitivity: float = REPLACE_SENSITIVITY) -> float:
    """Smallest epsilon such that ``releases`` Gaussian releases are (epsilon, delta)-DP (exact, GDP).

    Parameters
    ----------
    releases : updates sent so far (T).
    noise_multiplier : z; the noise std is ``z * clip``.
    delta : target delta in (0, 1).
    sensitivity : L2 sensitivity in units of ``clip`` (2 for replace-one, 1 for add/remove-one).

    Returns ``inf`` when there is no noise, 0 when nothing was released.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    mu = sensitivity * math.sqrt(releases) / noise_multiplier
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, mu) > delta:  # delta(eps) decreases in eps
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi
