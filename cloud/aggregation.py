"""Pure aggregation math: staleness weights, FedBuff / FedAsync / FedAvg, robust combiners, server optimizer.

Everything here is a function over ``dict[str, np.ndarray]`` (adapter name -> float32 array): no Flower,
no Ray, no I/O, so each rule is unit-tested against a NumPy reference.

* FedBuff (Nguyen et al., AISTATS 2022): after ``K`` accepted updates the server applies
  ``Δ = Σ_i n_i w(s_i) Δ_i / Σ_i n_i`` (example-weighted mean of staleness-scaled deltas; with equal
  ``n_i`` this is the paper's ``(1/K) Σ w(s_i) Δ_i``), then ``m ← β m + Δ``, ``x ← x + η m``.
* FedAsync (Xie et al., 2019) is FedBuff with ``K = 1``: ``x ← x + η w(s) Δ``.
* Synchronous FedAvg is the same rule with every staleness 0 (``w = 1``) and ``K`` = nodes per round.
* Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) treat the aggregated delta
  ``Δ`` as a pseudo-gradient step (:func:`server_opt_step`): ``sgd`` ``x ← x + η Δ``; ``avgm`` (FedAvgM)
  ``m ← β1 m + Δ``, ``x ← x + η m``; ``adam`` / ``yogi`` ``m ← β1 m + (1-β1) Δ``, ``v`` by Adam's or Yogi's
  rule, ``x ← x + η m / (√v + τ)`` with ``v`` starting at ``τ²`` (the paper's Algorithm 2, no bias correction).
* Robust combiners replace the weighted mean: coordinate-wise median and trimmed mean over the
  staleness-scaled deltas (unweighted by examples, as robust statistics are). Norm clipping bounds any
  single update first (:func:`clip_by_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "ADAPTIVE_SERVER_LR",
    "SERVER_OPTS",
    "OptState",
    "Robust",
    "ServerOpt",
    "StalenessFn",
    "State",
    "clip_by_norm",
    "coordinate_median",
    "default_server_lr",
    "fedasync_delta",
    "fedavg_delta",
    "fedbuff_delta",
    "global_norm",
    "server_opt_step",
    "server_step",
    "staleness_weight",
    "trimmed_mean",
    "weighted_mean",
]

State = dict[str, np.ndarray]
StalenessFn = Literal["constant", "sqrt", "polynomial", "hinge"]
Robust = Literal["none", "median", "trimmed_mean"]


def staleness_weight(s: float, *, fn: str = "sqrt", a: float = 0.5, b: int = 4) -> float:
    """Weight of an update that is ``s`` versions stale.

    ``constant``: 1; ``sqrt``: ``1/sqrt(1+s)``; ``polynomial``: ``(1+s)^-a``; ``hinge``: 1 for ``s <= b``,
    then ``1/(a (s-b) + 1)`` (FedAsync's three families plus FedBuff's default).
    """
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")
    if fn == "constant":
        return 1.0
    if fn == "sqrt":
        return 1.0 / math.sqrt(1.0 + s)
    if fn == "polynomial":
        return float((1.0 + s) ** (-a))
    if fn == "hinge":
        return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    raise ValueError(f"unknown staleness function {fn!r}")


def global_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of ``delta`` viewed as one vector (float64 accumulation)."""
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[State, float]:
    """Scale ``delta`` so that its global norm is at most ``max_norm``; return it and the factor applied."""
    norm = global_norm(delta)
    factor = 1.0 if norm <= max_norm or norm == 0.0 else max_norm / norm
    return {k: (np.asarray(v, np.float32) * np.float32(factor)) for k, v in delta.items()}, factor


def _stack(deltas: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([np.asarray(d[key], dtype=np.float64) for d in deltas])  # (N, *shape)


def weighted_mean(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> State:
    """``Σ w_i Δ_i / Σ w_i`` per tensor."""
    if not deltas:
        raise ValueError("no deltas to combine")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(deltas),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per delta, with a positive sum")
    w = w / w.sum()
    return {k: np.tensordot(w, _stack(deltas, k), axes=1).astype(np.float32) for k in deltas[0]}


def coordinate_median(deltas: Sequence[Mapping[str, np.ndarray]]) -> State:
    """Coordinate-wise median (Yin et al., 2018)."""
    if not deltas:
        raise ValueError("no deltas to combine")
    return {k: np.median(_stack(deltas, k), axis=0).astype(np.float32) for k in deltas[0]}


def trimmed_mean(deltas: Sequence[Mapping[str, np.ndarray]], trim_ratio: float) -> State:
    """Coordinate-wise mean after dropping the ``floor(trim_ratio * N)`` smallest and largest values."""
    if not deltas:
        raise ValueError("no deltas to combine")
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(deltas)
    t = math.floor(trim_ratio * n)
    out: State = {}
    for k in deltas[0]:
        s = np.sort(_stack(deltas, k), axis=0)
        out[k] = s[t : n - t].mean(axis=0).astype(np.float32)
    return out


def fedbuff_delta(
    deltas: Sequence[Mapping[str, np.ndarray]],
    staleness: Sequence[int],
    num_examples: Sequence[float] | None = None,
    *,
    fn: str = "sqrt",
    a: float = 0.5,
    b: int = 4,
    robust: str = "none",
    trim_ratio: float = 0.1,
) -> State:
    """The aggregated delta of one FedBuff buffer (before the server learning rate and momentum).

    ``robust="none"``: ``Σ n_i w(s_i) Δ_i / Σ n_i``; ``median`` / ``trimmed_mean``: that statistic over the
    staleness-scaled deltas ``w(s_i) Δ_i``.
    """
    if not deltas or len(deltas) != len(staleness):
        raise ValueError("need at least one delta and one staleness per delta")
    n = np.ones(len(deltas)) if num_examples is None else np.asarray(num_examples, dtype=np.float64)
    w = np.asarray([staleness_weight(s, fn=fn, a=a, b=b) for s in staleness])
    if robust == "none":
        coef = n * w / n.sum()  # (N,)
        return {k: np.tensordot(coef, _stack(deltas, k), axes=1).astype(np.float32) for k in deltas[0]}
    scaled_deltas = [{k: np.asarray(v, np.float32) * np.float32(wi) for k, v in d.items()}
                     for d, wi in zip(deltas, w)]
    if robust == "median":
        return coordinate_median(scaled_deltas)
    if robust == "trimmed_mean":
        return trimmed_mean(scaled_deltas, trim_ratio)
    raise ValueError(f"unknown robust combiner {robust!r}")


def fedavg_delta(deltas: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[float]) -> State:
    """Synchronous FedAvg: the example-weighted mean of the round's deltas (all staleness 0)."""
    return fedbuff_delta(deltas, [0] * len(deltas), num_examples, fn="constant")


def fedasync_delta(delta: Mapping[str, np.ndarray], staleness: int, *, fn: str = "sqrt", a: float = 0.5,
                   b: int = 4) -> State:
    """FedAsync: one update scaled by its staleness weight (FedBuff with K = 1)."""
    return fedbuff_delta([delta], [staleness], None, fn=fn, a=a, b=b)


def server_step(
    params: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    momentum: Mapping[str, np.ndarray] | None,
    *,
    lr: float = 1.0,
    beta: float = 0.0,
) -> tuple[State, State]:
    """Apply an aggregated delta with server learning rate and heavy-ball momentum (FedAvgM).

    ``m ← β m + Δ``; ``x ← x + lr · m``. Returns the new parameters and the new momentum.
    """
    if set(params) != set(delta):
        raise ValueError("delta keys differ from the parameters")
    new_m: State = {}
    new_p: State = {}
    for k, p in params.items():
        m_prev = np.zeros_like(p, dtype=np.float32) if momentum is None or k not in momentum else momentum[k]
        m = (np.float32(beta) * np.asarray(m_prev, np.float32) + np.asarray(delta[k], np.float32))
        new_m[k] = m.astype(np.float32)
        new_p[k] = (np.asarray(p, np.float32) + np.float32(lr) * new_m[k]).astype(np.float32)
    return new_p, new_m


ServerOpt = Literal["sgd", "avgm", "adam", "yogi"]
SERVER_OPTS: tuple[str, ...] = ("sgd", "avgm", "adam", "yogi")
OptState = dict[str, State]  # slot ("m", "v") -> name -> array
# adam / yogi move every coordinate by about lr per version: measured on the quickstart's devices from the
# cloud-pretrained base (benchmarks/server_opt.py, 2 seeds), 1e-3 beat sgd, 3e-3 tied it and 1e-2 lost 15 points
ADAPTIVE_SERVER_LR = 1e-3


def default_server_lr(opt: str, beta1: float) -> float:
    """The server learning rate ``aggregation.server_lr = 0`` stands for: sgd 1 (FedAvg's plain step), avgm
    ``1 - beta1`` (the momentum then averages deltas with sgd's long-run step size), adam / yogi
    :data:`ADAPTIVE_SERVER_LR`."""
    if opt not in SERVER_OPTS:
        raise ValueError(f"unknown server optimizer {opt!r} (known: {SERVER_OPTS})")
    return {"sgd": 1.0, "avgm": 1.0 - beta1}.get(opt, ADAPTIVE_SERVER_LR)


def server_opt_step(
    params: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    opt_state: Mapping[str, Mapping[str, np.ndarray]] | None,
    *,
    opt: str = "sgd",
    lr: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[State, OptState]:
    """Apply one aggregated delta with a server optimizer; return the new parameters and optimizer state.

    ``opt_state`` holds the optimizer's slots per tensor (``{}`` / ``None`` before the first step):
    ``m`` (first moment or momentum) and ``v`` (second moment, adam / yogi). ``sgd`` keeps no state.
    """
    if set(params) != set(delta):
        raise ValueError("delta keys differ from the parameters")
    if opt not in SERVER_OPTS:
        raise ValueError(f"unknown server optimizer {opt!r} (known: {SERVER_OPTS})")
    if opt in ("sgd", "avgm"):
        m_prev = dict((opt_state or {}).get("m", {})) if opt == "avgm" else None
        new_p, new_m = server_step(params, delta, m_prev, lr=lr, beta=beta1 if opt == "avgm" else 0.0)
        return new_p, ({"m": new_m} if opt == "avgm" else {})
    prev_m, prev_v = (opt_state or {}).get("m", {}), (opt_state or {}).get("v", {})
    b1, b2, t = np.float32(beta1), np.float32(beta2), np.float32(tau)
    out_p: State = {}
    out_m: State = {}
    out_v: State = {}
    for k, p in params.items():
        d = np.asarray(delta[k], np.float32)
        m0 = np.asarray(prev_m[k], np.float32) if k in prev_m else np.zeros_like(d)
        v0 = np.asarray(prev_v[k], np.float32) if k in prev_v else np.full_like(d, t * t)
        m = b1 * m0 + (np.float32(1) - b1) * d
        d2 = d * d
        if opt == "adam":
            v = b2 * v0 + (np.float32(1) - b2) * d2
        else:  # yogi: v moves towards d² additively, by at most (1-β2) d² per step
            v = v0 - (np.float32(1) - b2) * d2 * np.sign(v0 - d2)
        out_m[k], out_v[k] = m.astype(np.float32), v.astype(np.float32)
        out_p[k] = (np.asarray(p, np.float32) + np.float32(lr) * m / (np.sqrt(v) + t)).astype(np.float32)
    return out_p, {"m": out_m, "v": out_v}
