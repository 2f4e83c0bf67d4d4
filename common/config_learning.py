"""Config sections of what is learned and how: the model's shape, autocast precision, modality importance,
local training on a device and global training on the cloud (Ray Train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedge.common.config_check import check

__all__ = [
    "LR_SCHEDULES",
    "MODALITIES",
    "PRECISIONS",
    "SCOPES",
    "ImportanceConfig",
    "ModelConfig",
    "PrecisionConfig",
    "TrainConfig",
    "TrainingConfig",
]

MODALITIES: tuple[str, ...] = ("image", "audio")
PRECISIONS = ("fp32", "fp16", "bf16")
SCOPES = ("adapters", "partial", "full")  # fedge.common.scope: what devices train and send
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class PrecisionConfig:
    """Autocast precision per modality encoder (the brief: image fp16/bf16, audio bf16)."""

    image: str = "bf16"
    audio: str = "bf16"

    def __post_init__(self) -> None:
        for m in MODALITIES:
            check(getattr(self, m) in PRECISIONS, f"precision.{m}", f"must be one of {PRECISIONS}")


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
            check(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        check(self.num_classes >= 2, "model.num_classes", "must be >= 2")
        check(1 <= self.top_k <= self.num_experts, "model.top_k", "must be in [1, model.num_experts]")
        check(self.capacity_factor >= 0, "model.capacity_factor", "must be >= 0")
        check(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")
        check(self.expert_affinity in ("shared", "modality"), "model.expert_affinity",
               "must be 'shared' or 'modality'")
        check(self.shared_experts >= 0, "model.shared_experts", "must be >= 0")
        if self.expert_affinity == "shared":
            check(self.shared_experts == 0, "model.shared_experts",
                   "needs model.expert_affinity = 'modality' (with 'shared' every expert is shared)")
        else:
            private = self.num_experts - self.shared_experts
            check(private >= len(MODALITIES) and private % len(MODALITIES) == 0, "model.shared_experts",
                   f"model.num_experts - model.shared_experts ({private}) must be a positive multiple of the "
                   f"{len(MODALITIES)} modalities (one private expert group each)")
            group = private // len(MODALITIES) + self.shared_experts
            check(self.top_k <= group, "model.top_k",
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
        check(self.scope in SCOPES, "train.scope", f"must be one of {SCOPES}")
        check(self.local_steps >= 1, "train.local_steps", "must be >= 1")
        check(self.local_epochs >= 0, "train.local_epochs", "must be >= 0")
        check(self.max_local_steps >= 0, "train.max_local_steps", "must be >= 0")
        check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}")
        check(self.prox_mu >= 0, "train.prox_mu", "must be >= 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(0.0 <= self.modality_dropout < 1.0, "train.modality_dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class ImportanceConfig:
    """Modality importance: each example's loss is weighted by the mean weight of the modalities it carries."""

    image: float = 1.0
    audio: float = 1.0

    def __post_init__(self) -> None:
        for m in MODALITIES:
            check(getattr(self, m) >= 0, f"importance.{m}", "must be >= 0")
        check(any(getattr(self, m) > 0 for m in MODALITIES), "importance", "one weight must be > 0")


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
        check(self.every_versions >= 0, "training.every_versions", "must be >= 0")
        check(self.workers >= 1, "training.workers", "must be >= 1")
        check(self.use_gpu in ("auto", "on", "off"), "training.use_gpu", "must be 'auto', 'on' or 'off'")
        check(self.cpus_per_worker >= 0, "training.cpus_per_worker", "must be >= 0 (0: share CPUs other actors hold)")
        check(self.steps >= 1, "training.steps", "must be >= 1")
        check(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        check(self.lr > 0, "training.lr", "must be > 0")
        check(self.grad_accum >= 1, "training.grad_accum", "must be >= 1")
        check(self.aux_weight >= 0, "training.aux_weight", "must be >= 0")
        check(0.0 <= self.modality_dropout < 1.0, "training.modality_dropout", "must be in [0, 1)")
        check(self.log_every >= 1, "training.log_every", "must be >= 1")
        check(self.samples >= 1, "training.samples", "must be >= 1")
        check(self.health_check_s > 0, "training.health_check_s", "must be > 0")
