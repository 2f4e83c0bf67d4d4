"""Config sections of the federation: update compression, checkpoints and restarts, aggregation (async
FedBuff or sync FedAvg, staleness, robustness, secure aggregation) and client-side differential privacy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedge.common.config_check import check

__all__ = [
    "SERVER_OPTS",
    "STALENESS_FNS",
    "AggregationConfig",
    "CommunicationConfig",
    "FaultToleranceConfig",
    "PrivacyConfig",
]

STALENESS_FNS = ("constant", "sqrt", "polynomial", "hinge")
SERVER_OPTS = ("sgd", "avgm", "adam", "yogi")


@dataclass(frozen=True)
class CommunicationConfig:
    """Update compression: top-k sparsification then quantization, with client-side error feedback."""

    compression: Literal["none", "topk"] = "topk"
    topk_ratio: float = 0.05
    quant_bits: int = 8
    error_feedback: bool = True

    def __post_init__(self) -> None:
        check(self.compression in ("none", "topk"), "communication.compression", "must be 'none' or 'topk'")
        check(0.0 < self.topk_ratio <= 1.0, "communication.topk_ratio", "must be in (0, 1]")
        check(self.quant_bits in (4, 8, 32), "communication.quant_bits", "must be 4, 8 or 32")


@dataclass(frozen=True)
class FaultToleranceConfig:
    """Checkpoint frequency (in versions for the aggregator, steps for the trainer) and Ray Train's restarts."""

    checkpoint_every: int = 5
    max_failures: int = 1

    def __post_init__(self) -> None:
        check(self.checkpoint_every >= 1, "fault_tolerance.checkpoint_every", "must be >= 1")
        check(self.max_failures >= 0, "fault_tolerance.max_failures", "must be >= 0")


@dataclass(frozen=True)
class AggregationConfig:
    """Server side: async FedBuff or sync FedAvg, staleness weighting, robustness."""

    mode: Literal["async", "sync"] = "async"
    versions: int = 10  # global versions to produce before the run ends
    buffer_size: int = 4  # K: accepted updates per new version
    concurrency: int = 8  # C: nodes training at once
    staleness: str = "sqrt"
    staleness_a: float = 0.5  # polynomial exponent: (1+s)^-a
    staleness_b: int = 4  # hinge: w=1 for s<=b, then 1/(a(s-b)+1)
    max_staleness: int = 10
    # server optimizer on each aggregated delta (Reddi et al., Adaptive Federated Optimization): sgd x += lr*d;
    # avgm: heavy-ball momentum beta1; adam / yogi: per-coordinate steps lr*m/(sqrt(v)+tau)
    server_opt: Literal["sgd", "avgm", "adam", "yogi"] = "sgd"
    server_lr: float = 0.0  # 0: the optimizer's default (fedge.cloud.aggregation.default_server_lr)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    max_norm: float = 100.0  # update-norm bound
    norm_action: Literal["clip", "reject"] = "clip"
    robust: Literal["none", "median", "trimmed_mean"] = "none"
    trim_ratio: float = 0.1
    # bounds relative to the recently accepted updates (cloud/robust.py); 0 turns a bound off
    norm_factor: float = 2.0  # clip each update to this x the median norm of the last `window` accepted ones
    norm_warmup: int = 4  # accepted norms needed before norm_factor applies (max_norm alone until then)
    examples_factor: float = 2.0  # weigh an update by min(claimed examples, this x the median recent claim)
    max_examples: float = 0.0  # an absolute cap on the example count an update is weighed by
    window: int = 32  # recent accepted updates the relative bounds look at (they span versions)
    outlier_threshold: float = 2.0  # leave out buffered updates whose Krum-style score exceeds this (0: off)
    min_cosine: float = -1.0  # leave out buffered updates whose cosine with the recent mean update is below (-1: off)
    replay_window: int = 4096  # digests of accepted payloads kept to refuse replays
    min_nodes: int = 1
    reply_timeout_s: float = 600.0
    eval_every: int = 1
    clock: Literal["auto", "real", "virtual"] = "auto"  # auto: virtual under simulation, real in deployment
    resume: bool = True  # restart from run_dir's aggregator checkpoint when there is one
    stop_at_accuracy: float = 0.0  # end the run once an evaluated version reaches it (0 = run all versions)
    # secure aggregation (docs/secure_aggregation.md): the server unmasks only each group's sum
    secure: bool = False
    secure_clip: float = 1.0  # L2 clip each device applies before quantising into the masking ring (adaptive: the first)
    secure_adaptive_clip: bool = True  # the clip follows the devices' mean update norm, which groups send masked
    secure_keep: float = 0.5  # fraction of coordinates a group sends (a shared random set, fresh per group)
    secure_levels: int = 1  # quantisation levels per side of each sent coordinate (1: ternary, 2-bit ring values)
    secure_threshold: float = 0.6  # Shamir threshold as a fraction of the group (1 - it: the dropout tolerated)
    secure_dp_noise: float = 0.0  # central DP: Gaussian noise std (x secure_clip) the server adds once per sum

    def __post_init__(self) -> None:
        check(self.mode in ("async", "sync"), "aggregation.mode", "must be 'async' or 'sync'")
        check(self.versions >= 1, "aggregation.versions", "must be >= 1")
        check(self.buffer_size >= 1, "aggregation.buffer_size", "must be >= 1")
        check(self.concurrency >= 1, "aggregation.concurrency", "must be >= 1")
        check(self.staleness in STALENESS_FNS, "aggregation.staleness", f"must be one of {STALENESS_FNS}")
        check(self.staleness_a >= 0, "aggregation.staleness_a", "must be >= 0")
        check(self.staleness_b >= 0, "aggregation.staleness_b", "must be >= 0")
        check(self.max_staleness >= 0, "aggregation.max_staleness", "must be >= 0")
        check(self.server_lr >= 0, "aggregation.server_lr", "must be >= 0 (0: the server optimizer's default)")
        check(self.server_opt in SERVER_OPTS, "aggregation.server_opt", f"must be one of {SERVER_OPTS}")
        check(0.0 <= self.beta1 < 1.0, "aggregation.beta1", "must be in [0, 1)")
        check(0.0 <= self.beta2 < 1.0, "aggregation.beta2", "must be in [0, 1)")
        check(self.tau > 0, "aggregation.tau", "must be > 0")
        check(self.max_norm > 0, "aggregation.max_norm", "must be > 0")
        check(self.norm_action in ("clip", "reject"), "aggregation.norm_action", "must be 'clip' or 'reject'")
        check(
            self.robust in ("none", "median", "trimmed_mean"),
            "aggregation.robust",
            "must be 'none', 'median' or 'trimmed_mean'",
        )
        check(0.0 <= self.trim_ratio < 0.5, "aggregation.trim_ratio", "must be in [0, 0.5)")
        for k in ("norm_factor", "examples_factor", "max_examples", "outlier_threshold"):
            v = getattr(self, k)
            check(math.isfinite(v) and v >= 0.0, f"aggregation.{k}", "must be finite and >= 0 (0 = off)")
        check(-1.0 <= self.min_cosine <= 1.0, "aggregation.min_cosine", "must be in [-1, 1] (-1 = off)")
        check(self.norm_warmup >= 0, "aggregation.norm_warmup", "must be >= 0")
        check(self.window >= 1, "aggregation.window", "must be >= 1")
        check(self.replay_window >= 1, "aggregation.replay_window", "must be >= 1")
        check(self.min_nodes >= 1, "aggregation.min_nodes", "must be >= 1")
        check(self.reply_timeout_s > 0, "aggregation.reply_timeout_s", "must be > 0")
        check(self.eval_every >= 1, "aggregation.eval_every", "must be >= 1")
        check(self.clock in ("auto", "real", "virtual"), "aggregation.clock",
               "must be 'auto', 'real' or 'virtual'")
        check(0.0 <= self.stop_at_accuracy <= 1.0, "aggregation.stop_at_accuracy", "must be in [0, 1]")
        check(self.secure_clip > 0, "aggregation.secure_clip", "must be > 0")
        check(0.0 < self.secure_keep <= 1.0, "aggregation.secure_keep", "must be in (0, 1]")
        check(1 <= self.secure_levels <= 1000, "aggregation.secure_levels", "must be in [1, 1000]")
        check(0.0 < self.secure_threshold <= 1.0, "aggregation.secure_threshold", "must be in (0, 1]")
        check(self.secure_dp_noise >= 0, "aggregation.secure_dp_noise", "must be >= 0")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-side DP: clip the update to ``clip`` and add N(0, (noise_multiplier*clip)^2)."""

    clip: float = 0.0  # 0 = off
    noise_multiplier: float = 0.0
    delta: float = 1e-5  # the delta at which a device reports its cumulative epsilon

    def __post_init__(self) -> None:
        check(self.clip >= 0, "dp.clip", "must be >= 0")
        check(self.noise_multiplier >= 0, "dp.noise_multiplier", "must be >= 0")
        check(self.noise_multiplier == 0 or self.clip > 0, "dp.noise_multiplier",
               "needs dp.clip > 0 (the noise scale is noise_multiplier * clip)")
        check(0.0 < self.delta < 1.0, "dp.delta", "must be in (0, 1)")
