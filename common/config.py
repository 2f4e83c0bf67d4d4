"""Typed, validated run configuration: Flower run config (flat dotted keys) -> TOML file -> CLI overrides.

The shape mirrors the brief's framework config (``modal_types``, per-modality ``precision``,
``communication``, ``fault_tolerance``) plus the sections fedge itself needs. Every section is a frozen
dataclass validated in ``__post_init__``; unknown keys and bad values raise :class:`ConfigError` naming the
dotted key. Modules never read this object whole: entry points pass flat keyword arguments on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "LR_SCHEDULES",
    "MODALITIES",
    "PRECISIONS",
    "REMOVED_KEYS",
    "RUNS_DIR_ENV",
    "SCOPES",
    "SERVER_OPTS",
    "STALENESS_FNS",
    "AggregationConfig",
    "CommunicationConfig",
    "ConfigError",
    "DashboardConfig",
    "DataConfig",
    "FaultToleranceConfig",
    "FedgeConfig",
    "ImportanceConfig",
    "ModelConfig",
    "PrecisionConfig",
    "PrivacyConfig",
    "ProfilesConfig",
    "PublishConfig",
    "ShardsConfig",
    "SimulationConfig",
    "TrainConfig",
    "TrainingConfig",
    "config_from_context",
    "default_run_dir",
    "load_config",
    "parse_overrides",
]

MODALITIES: tuple[str, ...] = ("image", "audio")
PRECISIONS = ("fp32", "fp16", "bf16")
STALENESS_FNS = ("constant", "sqrt", "polynomial", "hinge")
SERVER_OPTS = ("sgd", "avgm", "adam", "yogi")
SCOPES = ("adapters", "partial", "full")  # fedge.common.scope: what devices train and send
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the dotted key."""


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        _fail(key, msg)


@dataclass(frozen=True)
class PrecisionConfig:
    """Autocast precision per modality encoder (the brief: image fp16/bf16, audio bf16)."""

    image: str = "bf16"
    audio: str = "bf16"

    def __post_init__(self) -> None:
        for m in MODALITIES:
            _check(getattr(self, m) in PRECISIONS, f"precision.{m}", f"must be one of {PRECISIONS}")


@dataclass(frozen=True)
class CommunicationConfig:
    """Update compression: top-k sparsification then quantization, with client-side error feedback."""

    compression: Literal["none", "topk"] = "topk"
    topk_ratio: float = 0.05
    quant_bits: int = 8
    error_feedback: bool = True

    def __post_init__(self) -> None:
        _check(self.compression in ("none", "topk"), "communication.compression", "must be 'none' or 'topk'")
        _check(0.0 < self.topk_ratio <= 1.0, "communication.topk_ratio", "must be in (0, 1]")
        _check(self.quant_bits in (4, 8, 32), "communication.quant_bits", "must be 4, 8 or 32")


@dataclass(frozen=True)
class FaultToleranceConfig:
    """Checkpoint frequency (in versions for the aggregator, steps for the trainer) and Ray Train's restarts."""

    checkpoint_every: int = 5
    max_failures: int = 1

    def __post_init__(self) -> None:
        _check(self.checkpoint_every >= 1, "fault_tolerance.checkpoint_every", "must be >= 1")
        _check(self.max_failures >= 0, "fault_tolerance.max_failures", "must be >= 0")


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
    secure_clip: float = 1.0  # L2 clip each device applies before quantising into the masking ring
    secure_threshold: float = 0.6  # Shamir threshold as a fraction of the group (1 - it: the dropout tolerated)
    secure_dp_noise: float = 0.0  # central DP: Gaussian noise std (x secure_clip) the server adds once per sum

    def __post_init__(self) -> None:
        _check(self.mode in ("async", "sync"), "aggregation.mode", "must be 'async' or 'sync'")
        _check(self.versions >= 1, "aggregation.versions", "must be >= 1")
        _check(self.buffer_size >= 1, "aggregation.buffer_size", "must be >= 1")
        _check(self.concurrency >= 1, "aggregation.concurrency", "must be >= 1")
        _check(self.staleness in STALENESS_FNS, "aggregation.staleness", f"must be one of {STALENESS_FNS}")
        _check(self.staleness_a >= 0, "aggregation.staleness_a", "must be >= 0")
        _check(self.staleness_b >= 0, "aggregation.staleness_b", "must be >= 0")
        _check(self.max_staleness >= 0, "aggregation.max_staleness", "must be >= 0")
        _check(self.server_lr >= 0, "aggregation.server_lr", "must be >= 0 (0: the server optimizer's default)")
        _check(self.server_opt in SERVER_OPTS, "aggregation.server_opt", f"must be one of {SERVER_OPTS}")
        _check(0.0 <= self.beta1 < 1.0, "aggregation.beta1", "must be in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, "aggregation.beta2", "must be in [0, 1)")
        _check(self.tau > 0, "aggregation.tau", "must be > 0")
        _check(self.max_norm > 0, "aggregation.max_norm", "must be > 0")
        _check(self.norm_action in ("clip", "reject"), "aggregation.norm_action", "must be 'clip' or 'reject'")
        _check(
            self.robust in ("none", "median", "trimmed_mean"),
            "aggregation.robust",
            "must be 'none', 'median' or 'trimmed_mean'",
        )
        _check(0.0 <= self.trim_ratio < 0.5, "aggregation.trim_ratio", "must be in [0, 0.5)")
        for k in ("norm_factor", "examples_factor", "max_examples", "outlier_threshold"):
            v = getattr(self, k)
            _check(math.isfinite(v) and v >= 0.0, f"aggregation.{k}", "must be finite and >= 0 (0 = off)")
        _check(-1.0 <= self.min_cosine <= 1.0, "aggregation.min_cosine", "must be in [-1, 1] (-1 = off)")
        _check(self.norm_warmup >= 0, "aggregation.norm_warmup", "must be >= 0")
        _check(self.window >= 1, "aggregation.window", "must be >= 1")
        _check(self.replay_window >= 1, "aggregation.replay_window", "must be >= 1")
        _check(self.min_nodes >= 1, "aggregation.min_nodes", "must be >= 1")
        _check(self.reply_timeout_s > 0, "aggregation.reply_timeout_s", "must be > 0")
        _check(self.eval_every >= 1, "aggregation.eval_every", "must be >= 1")
        _check(self.clock in ("auto", "real", "virtual"), "aggregation.clock",
               "must be 'auto', 'real' or 'virtual'")
        _check(0.0 <= self.stop_at_accuracy <= 1.0, "aggregation.stop_at_accuracy", "must be in [0, 1]")
        _check(self.secure_clip > 0, "aggregation.secure_clip", "must be > 0")
        _check(0.0 < self.secure_threshold <= 1.0, "aggregation.secure_threshold", "must be in (0, 1]")
        _check(self.secure_dp_noise >= 0, "aggregation.secure_dp_noise", "must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the shared multimodal mixture-of-experts (common/model.py)."""

    dim: int = 64
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 128
    num_classes: int = 10
    image_size: int = 32
    n_mels: int = 40
    audio_frames: int = 32
    capacity_factor: float = 0.0  # 0 = unlimited capacity
    dense: bool = False
    lora_rank: int = 4
    lora_alpha: float = 8.0
    expert_affinity: Literal["shared", "modality"] = "shared"  # "modality": one expert group per modality
    shared_experts: int = 0  # with "modality": experts (the last ones) that every modality may use
    base_path: str = ""  # published base weights (safetensors) every party loads; "" = the seed's init

    def __post_init__(self) -> None:
        for k in ("dim", "num_experts", "expert_hidden", "image_size", "n_mels", "audio_frames", "lora_rank"):
            _check(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        _check(self.num_classes >= 2, "model.num_classes", "must be >= 2")
        _check(1 <= self.top_k <= self.num_experts, "model.top_k", "must be in [1, model.num_experts]")
        _check(self.capacity_factor >= 0, "model.capacity_factor", "must be >= 0")
        _check(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")
        _check(self.expert_affinity in ("shared", "modality"), "model.expert_affinity",
               "must be 'shared' or 'modality'")
        _check(self.shared_experts >= 0, "model.shared_experts", "must be >= 0")
        if self.expert_affinity == "shared":
            _check(self.shared_experts == 0, "model.shared_experts",
                   "needs model.expert_affinity = 'modality' (with 'shared' every expert is shared)")
        else:
            private = self.num_experts - self.shared_experts
            _check(private >= len(MODALITIES) and private % len(MODALITIES) == 0, "model.shared_experts",
                   f"model.num_experts - model.shared_experts ({private}) must be a positive multiple of the "
                   f"{len(MODALITIES)} modalities (one private expert group each)")
            group = private // len(MODALITIES) + self.shared_experts
            _check(self.top_k <= group, "model.top_k",
                   f"must be <= the {group} experts of a modality's group (model.expert_affinity = 'modality')")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a device."""

    scope: Literal["adapters", "partial", "full"] = "adapters"  # parameters devices train and send
    local_steps: int = 20  # optimizer steps per update (a floor when local_epochs is set)
    local_epochs: float = 0.0  # > 0: passes over the device's samples per update (steps scale with its data)
    max_local_steps: int = 0  # > 0: cap on the steps local_epochs asks for (bounds a large device's round)
    batch_size: int = 32
    lr: float = 0.01
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to 0 over an update's steps
    prox_mu: float = 0.0  # FedProx: (mu/2)||w - w_global||^2 keeps non-IID devices near the received weights
    grad_accum: int = 1
    modality_dropout: float = 0.2

    def __post_init__(self) -> None:
        _check(self.scope in SCOPES, "train.scope", f"must be one of {SCOPES}")
        _check(self.local_steps >= 1, "train.local_steps", "must be >= 1")
        _check(self.local_epochs >= 0, "train.local_epochs", "must be >= 0")
        _check(self.max_local_steps >= 0, "train.max_local_steps", "must be >= 0")
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}")
        _check(self.prox_mu >= 0, "train.prox_mu", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(0.0 <= self.modality_dropout < 1.0, "train.modality_dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-side DP: clip the update to ``clip`` and add N(0, (noise_multiplier*clip)^2)."""

    clip: float = 0.0  # 0 = off
    noise_multiplier: float = 0.0
    delta: float = 1e-5  # the delta at which a device reports its cumulative epsilon

    def __post_init__(self) -> None:
        _check(self.clip >= 0, "dp.clip", "must be >= 0")
        _check(self.noise_multiplier >= 0, "dp.noise_multiplier", "must be >= 0")
        _check(self.noise_multiplier == 0 or self.clip > 0, "dp.noise_multiplier",
               "needs dp.clip > 0 (the noise scale is noise_multiplier * clip)")
        _check(0.0 < self.delta < 1.0, "dp.delta", "must be in (0, 1)")


@dataclass(frozen=True)
class ImportanceConfig:
    """Modality importance: each example's loss is weighted by the mean weight of the modalities it carries."""

    image: float = 1.0
    audio: float = 1.0

    def __post_init__(self) -> None:
        for m in MODALITIES:
            _check(getattr(self, m) >= 0, f"importance.{m}", "must be >= 0")
        _check(any(getattr(self, m) > 0 for m in MODALITIES), "importance", "one weight must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from: 'synthetic' (generated per partition), 'store' (SampleStore dirs) or 'pool'
    (a simulation's shared pool, :mod:`fedge.common.pool`; set by ``simulation.pool_samples``)."""

    source: Literal["synthetic", "store", "pool"] = "synthetic"
    # simulation: <store_root>/device-<partition> (store) or the pool's folder (pool); deployment: node config
    store_root: str = ""
    samples_per_device: int = 200
    eval_samples: int = 400
    partition: Literal["iid", "dirichlet", "speaker"] = "iid"  # speaker: one device per speaker (AV digits)
    dirichlet_alpha: float = 0.5
    missing_image: float = 0.0  # fraction of devices without a camera
    missing_audio: float = 0.0  # fraction of devices without a microphone
    eval_path: str = ""  # held-out arrays (NPZ: image, audio, label, mask, quality) the server evaluates on
    # AV digits: who speaks on the held-out device: "train" (the devices' speakers), "unseen" (English speakers no
    # device hears), "other" (speakers of other languages)
    eval_voices: Literal["train", "unseen", "other"] = "train"

    def __post_init__(self) -> None:
        _check(self.source in ("synthetic", "store", "pool"), "data.source",
               "must be 'synthetic', 'store' or 'pool'")
        _check(self.samples_per_device >= 1, "data.samples_per_device", "must be >= 1")
        _check(self.eval_samples >= 1, "data.eval_samples", "must be >= 1")
        _check(self.partition in ("iid", "dirichlet", "speaker"), "data.partition",
               "must be 'iid', 'dirichlet' or 'speaker'")
        _check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _check(self.eval_voices in ("train", "unseen", "other"), "data.eval_voices",
               "must be 'train', 'unseen' or 'other'")
        for k in ("missing_image", "missing_audio"):
            _check(0.0 <= getattr(self, k) <= 1.0, f"data.{k}", "must be in [0, 1]")
        _check(
            self.missing_image + self.missing_audio <= 1.0,
            "data.missing_image",
            "missing_image + missing_audio must be <= 1 (a device needs one modality)",
        )


@dataclass(frozen=True)
class TrainingConfig:
    """Global MoE training on the cloud (Ray Train): experts, router, encoders on the cloud's own data."""

    # N: the aggregator runs a global training every N aggregated versions and hands devices the new base
    # (0 = only on demand: `fedge cloud train`)
    every_versions: int = 0
    workers: int = 2  # Ray Train workers (DDP)
    use_gpu: Literal["auto", "on", "off"] = "auto"  # auto: one GPU per worker when the cluster has them
    cpus_per_worker: float = 1.0
    steps: int = 200  # optimizer steps per training run
    batch_size: int = 32  # per worker
    lr: float = 0.003
    grad_accum: int = 1
    aux_weight: float = 0.01  # weight of the router's load-balancing loss
    modality_dropout: float = 0.2
    log_every: int = 10  # steps between metric reports (TensorBoard + JSONL)
    samples: int = 800  # cloud-side curated samples when the data is generated
    storage_path: str = ""  # persistent Ray Train storage ("" = <run_dir or ./runs>/train)
    # the cloud's own training data: "" = generated and curated on Ray Data (fedge.cloud.curation), else an NPZ with
    # the trainer's columns image, audio, label, mask, quality (a simulation's curated cloud share)
    data_path: str = ""
    health_check_s: float = 0.5  # Ray Train controller poll: bounds report latency and failure detection

    def __post_init__(self) -> None:
        _check(self.every_versions >= 0, "training.every_versions", "must be >= 0")
        _check(self.workers >= 1, "training.workers", "must be >= 1")
        _check(self.use_gpu in ("auto", "on", "off"), "training.use_gpu", "must be 'auto', 'on' or 'off'")
        _check(self.cpus_per_worker >= 0, "training.cpus_per_worker", "must be >= 0 (0: share CPUs other actors hold)")
        _check(self.steps >= 1, "training.steps", "must be >= 1")
        _check(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        _check(self.lr > 0, "training.lr", "must be > 0")
        _check(self.grad_accum >= 1, "training.grad_accum", "must be >= 1")
        _check(self.aux_weight >= 0, "training.aux_weight", "must be >= 0")
        _check(0.0 <= self.modality_dropout < 1.0, "training.modality_dropout", "must be in [0, 1)")
        _check(self.log_every >= 1, "training.log_every", "must be >= 1")
        _check(self.samples >= 1, "training.samples", "must be >= 1")
        _check(self.health_check_s > 0, "training.health_check_s", "must be > 0")


@dataclass(frozen=True)
class SimulationConfig:
    """A local simulation (``fedge simulate``): how many virtual devices, what they record, when to stop."""

    devices: int = 8  # virtual devices (Flower SuperNodes); 1,000+ work
    dataset: Literal["avdigits", "synthetic"] = "avdigits"  # avdigits: rendered streams -> edge ingest -> stores
    fps: float = 10.0  # rendered camera frame rate
    shot_seconds: float = 1.0  # each shot shows (and its audio speaks) one digit for this long
    frame_size: int = 96  # rendered camera frames are frame_size x frame_size
    image_noise: float = 0.03  # camera sensor noise (std, fraction of full scale)
    snr_db: float = 20.0  # microphone speech-to-noise ratio
    # each recording's speech-to-noise ratio is drawn uniformly from [snr_db, snr_db + snr_db_spread] (quiet and
    # noisy rooms, near and far microphones); 0 = every recording at snr_db
    snr_db_spread: float = 0.0
    speech: Literal["fill", "once"] = "fill"  # the digit spoken through each shot, or once at a random moment
    target_accuracy: float = 0.0  # report virtual time / bytes to reach it (0 = none)
    time_budget_s: float = 0.0  # stop after this much virtual time (0 = run aggregation.versions)
    client_cpus: float = 1.0  # Ray CPUs per virtual client
    num_cpus: int = 0  # Ray CPUs for the whole simulation (0 = all, at most 4)
    pretrain_steps: int = 600  # cloud pretrains the base on its curated share before the run (0 = off)
    cloud_samples: int = 400  # size of the cloud's curated share (rendered + ingested like a device's)
    pretrain_lr: float = 0.001  # Adam learning rate of the cloud's base pretraining
    # the cloud's labelled data for that pretraining, a SampleStore directory or an NPZ ("" = with rendered
    # AV digits: the cloud's rendered share; with data.source = "store": no pretraining)
    pretrain_data: str = ""
    # AV digits at scale: > 0 renders and ingests one shared pool of this many shots (cached, reused by any
    # device count) and each device draws data.samples_per_device of its samples by data.partition, instead of
    # every device rendering its own streams; 0 = per-device streams
    pool_samples: int = 0

    def __post_init__(self) -> None:
        _check(self.devices >= 1, "simulation.devices", "must be >= 1")
        _check(self.pool_samples >= 0, "simulation.pool_samples",
               "must be >= 0 (0: every device renders its own streams)")
        _check(self.dataset in ("avdigits", "synthetic"), "simulation.dataset", "must be 'avdigits' or 'synthetic'")
        _check(self.fps > 0, "simulation.fps", "must be > 0")
        _check(self.shot_seconds > 0, "simulation.shot_seconds", "must be > 0")
        _check(self.frame_size >= 16, "simulation.frame_size", "must be >= 16")
        _check(0.0 <= self.image_noise <= 1.0, "simulation.image_noise", "must be in [0, 1]")
        _check(self.speech in ("fill", "once"), "simulation.speech", "must be 'fill' or 'once'")
        _check(self.snr_db_spread >= 0, "simulation.snr_db_spread", "must be >= 0")
        _check(0.0 <= self.target_accuracy <= 1.0, "simulation.target_accuracy", "must be in [0, 1]")
        _check(self.time_budget_s >= 0, "simulation.time_budget_s", "must be >= 0")
        _check(self.client_cpus > 0, "simulation.client_cpus", "must be > 0")
        _check(self.num_cpus >= 0, "simulation.num_cpus", "must be >= 0")
        _check(self.pretrain_steps >= 0, "simulation.pretrain_steps", "must be >= 0")
        _check(self.cloud_samples >= 1, "simulation.cloud_samples", "must be >= 1")
        _check(self.pretrain_lr > 0, "simulation.pretrain_lr", "must be > 0")


@dataclass(frozen=True)
class ProfilesConfig:
    """Simulated device profiles for the virtual clock (cloud/clock.py), derived from seed + partition id.

    A device's local step takes ``base_step_s * slowdown / speed`` virtual seconds, with ``speed`` lognormal
    (sigma ``speed_sigma``) and ``slowdown`` drawn in [min, max] for the ``straggler_fraction`` of devices
    (1 for the others); its link carries ``bandwidth_mbps`` (lognormal, sigma ``bandwidth_sigma``) both ways.
    ``dropout``: probability that a dispatched device never answers (its update is lost, counted as timeout).
    """

    base_step_s: float = 0.05
    speed_sigma: float = 0.2
    straggler_fraction: float = 0.2
    straggler_slowdown_min: float = 5.0
    straggler_slowdown_max: float = 10.0
    bandwidth_mbps: float = 10.0
    bandwidth_sigma: float = 0.3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(self.base_step_s > 0, "profiles.base_step_s", "must be > 0")
        _check(self.speed_sigma >= 0, "profiles.speed_sigma", "must be >= 0")
        _check(0.0 <= self.straggler_fraction <= 1.0, "profiles.straggler_fraction", "must be in [0, 1]")
        _check(self.straggler_slowdown_min >= 1.0, "profiles.straggler_slowdown_min", "must be >= 1")
        _check(self.straggler_slowdown_max >= self.straggler_slowdown_min, "profiles.straggler_slowdown_max",
               "must be >= profiles.straggler_slowdown_min")
        _check(self.bandwidth_mbps > 0, "profiles.bandwidth_mbps", "must be > 0")
        _check(self.bandwidth_sigma >= 0, "profiles.bandwidth_sigma", "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, "profiles.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class ShardsConfig:
    """Sharded model delivery to a device (edge/shards.py): where the shard server is and what to trust.

    ``public_key`` is the pinned Ed25519 public key (PEM file) that every manifest must be signed with;
    ``ca_file`` pins the server's TLS CA (empty: system trust store); ``budget_mb`` bounds the on-disk cache.
    Per-device tokens are node secrets: they come from the command line or ``FEDGE_SHARD_TOKEN``, never here.
    ``allow_insecure_http`` lets a token go to a plain ``http://`` url (refused otherwise; trusted networks only).
    ``timeout_s`` bounds each request; ``retry_s`` is how long a device keeps retrying a cut or refused download
    (resuming where it stopped) before the round fails, long enough to ride out a shard server restart.
    """

    url: str = ""
    public_key: str = ""
    cache_dir: str = ""
    budget_mb: float = 64.0
    ca_file: str = ""
    timeout_s: float = 10.0
    retry_s: float = 30.0
    allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        _check(self.url == "" or self.url.startswith(("http://", "https://")), "shards.url",
               "must start with http:// or https://")
        _check(self.budget_mb > 0, "shards.budget_mb", "must be > 0")
        _check(self.timeout_s > 0, "shards.timeout_s", "must be > 0")
        _check(self.retry_s >= 0, "shards.retry_s", "must be >= 0")


@dataclass(frozen=True)
class PublishConfig:
    """Where the cloud publishes every new base (cloud/publisher.py) and how devices get it.

    ``store``: the model store root the shard server serves ("" = ``<run_dir or training.storage_path>/models``
    when global training is on); ``signing_key``: the Ed25519 private key (PEM) that signs manifests ("" = a key
    generated inside the store, for simulations: devices that pin a key need the real one); ``onnx``: export
    the ONNX inference shards of each base too; ``deltas``: publish each changed training shard also as a
    compressed delta against the previous base (a device holding it downloads about a quarter of the bytes).
    Devices find the shard server in their own node config (``shards-url``), never here.
    """

    store: str = ""
    signing_key: str = ""
    onnx: bool = True
    deltas: bool = True


@dataclass(frozen=True)
class DashboardConfig:
    """The live view of a running aggregator (cloud/dashboard): web page, ``/api/state``, ``/metrics``, TensorBoard.

    ``address``: ``[HOST:]PORT`` the ServerApp serves the dashboard on ("" = off; a bare port means
    127.0.0.1). Beyond loopback a token is required: ``$FEDGE_DASHBOARD_TOKEN`` or any device/operator token
    of ``tokens_file`` (the shard server's tokens file); ``public`` serves without one. Tokens are secrets:
    they never go in the config. ``tensorboard``: write TensorBoard scalars per version into ``run_dir/tb``
    while the run goes on.
    """

    address: str = ""
    public: bool = False
    tokens_file: str = ""
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.address:
            _, _, port = self.address.rpartition(":")
            _check(port.isdigit() and 0 <= int(port) <= 65535, "dashboard.address",
                   f"must be [HOST:]PORT with a port in 0..65535, got {self.address!r}")


@dataclass(frozen=True)
class FedgeConfig:
    """The whole run config."""

    modal_types: tuple[str, ...] = MODALITIES
    seed: int = 0
    run_dir: str = ""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    def __post_init__(self) -> None:
        mt = self.modal_types
        if isinstance(mt, str):
            mt = tuple(s.strip() for s in mt.split(",") if s.strip())
            object.__setattr__(self, "modal_types", mt)
        _check(len(mt) > 0, "modal_types", "must name at least one modality")
        for m in mt:
            _check(m in MODALITIES, "modal_types", f"unknown modality {m!r}; known: {MODALITIES}")
        _check(len(set(mt)) == len(mt), "modal_types", "lists a modality twice")

    # ------------------------------------------------------------------ conversions
    def to_flat(self) -> dict[str, Any]:
        """Flat dotted keys with Flower-compatible scalar values (tuples become comma-joined strings)."""
        out: dict[str, Any] = {}
        for key, value in _flatten(dataclasses.asdict(self)).items():
            out[key] = ",".join(value) if isinstance(value, (list, tuple)) else value
        return out

    def to_toml(self) -> str:
        """A TOML document that :func:`load_config` reads back to an equal config."""
        flat = self.to_flat()
        top = {k: v for k, v in flat.items() if "." not in k}
        lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
        sections: dict[str, list[str]] = {}
        for k, v in flat.items():
            if "." in k:
                sec, name = k.split(".", 1)
                sections.setdefault(sec, []).append(f"{name} = {_toml_value(v)}")
        for sec, body in sections.items():
            lines += ["", f"[{sec}]", *body]
        return "\n".join(lines) + "\n"

    def save(self, run_dir: str | Path) -> Path:
        """Write the resolved config into ``run_dir/config.toml`` (and .json) and return the TOML path."""
        d = Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.to_flat(), indent=2, sort_keys=True))
        path = d / "config.toml"
        path.write_text(self.to_toml())
        return path


RUNS_DIR_ENV = "FEDGE_RUNS_DIR"


def default_run_dir(run_id: int | str) -> Path:
    """Where a ServerApp started without ``run_dir`` keeps its record (config, metrics, events, checkpoints,
    bases): ``$FEDGE_RUNS_DIR/run-<run_id>``, by default under ``~/.fedge/runs``."""
    root = os.environ.get(RUNS_DIR_ENV) or str(Path.home() / ".fedge" / "runs")
    return Path(root).expanduser().resolve() / f"run-{run_id}"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a raw (TOML / CLI string / Flower scalar) value to the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple,) or tp is tuple:
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        _fail(key, f"expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            _fail(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, f"expected a number, got {value!r}")
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


# keys that once existed and changed nothing: an old config that sets them still loads, with a warning
REMOVED_KEYS = {"fault_tolerance.recovery_time_s": "it was a target, never a setting"}


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key in REMOVED_KEYS:
            warnings.warn(f"config key '{key}' is no longer used ({REMOVED_KEYS[key]}); ignored", stacklevel=2)
            continue
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"config key '{key}': unknown key (known here: {known})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _check(isinstance(v, Mapping), key, "expected a table of keys")
            kwargs[k] = _build(tp, v, key + ".")  # type: ignore[arg-type]
        else:
            if isinstance(tp, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            kwargs[k] = _coerce(key, v, tp)
    return cls(**kwargs)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key '{key}': '{p}' is a value, not a table")
            d = nxt
        d[parts[-1]] = v
    return out


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse CLI ``key=value`` overrides (values parsed as TOML scalars when possible, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        try:
            out[k] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k] = v
    return out


def load_config(
    run_config: Mapping[str, Any] | None = None,
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FedgeConfig:
    """Resolve a config from Flower's flat run config, then a TOML file, then flat overrides (in that order).

    Raises
    ------
    ConfigError
        On an unknown key or a bad value; the message names the dotted key.
    FileNotFoundError
        When ``toml_path`` does not exist.
    """
    tree: dict[str, Any] = {}
    if run_config:
        tree = _merge(tree, _nest(run_config))
    if toml_path is not None:
        p = Path(toml_path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            tree = _merge(tree, tomllib.loads(p.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: not valid TOML: {e}") from None
    if overrides:
        tree = _merge(tree, _nest(overrides))
    return _build(FedgeConfig, tree, "")


def config_from_context(run_config: Mapping[str, Any]) -> FedgeConfig:
    """The config of a Flower run: ``context.run_config`` overlaid by ``$FEDGE_RUN_CONFIG`` (a TOML path).

    ``fedge simulate`` resolves its scenario into a TOML file and points the variable at it, because
    ``run_simulation`` carries no run config; ``flwr run`` users set keys with ``--run-config``.
    """
    import os

    extra = os.environ.get("FEDGE_RUN_CONFIG")
    return load_config(run_config=run_config, toml_path=extra or None)
