"""Config sections of where samples come from and how simulated devices behave: the data source and
partition, a local simulation, and the device profiles of its virtual clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedge.common.config_check import check

__all__ = ["DataConfig", "ProfilesConfig", "SimulationConfig"]


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
        check(self.source in ("synthetic", "store", "pool"), "data.source",
               "must be 'synthetic', 'store' or 'pool'")
        check(self.samples_per_device >= 1, "data.samples_per_device", "must be >= 1")
        check(self.eval_samples >= 1, "data.eval_samples", "must be >= 1")
        check(self.partition in ("iid", "dirichlet", "speaker"), "data.partition",
               "must be 'iid', 'dirichlet' or 'speaker'")
        check(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        check(self.eval_voices in ("train", "unseen", "other"), "data.eval_voices",
               "must be 'train', 'unseen' or 'other'")
        for k in ("missing_image", "missing_audio"):
            check(0.0 <= getattr(self, k) <= 1.0, f"data.{k}", "must be in [0, 1]")
        check(
            self.missing_image + self.missing_audio <= 1.0,
            "data.missing_image",
            "missing_image + missing_audio must be <= 1 (a device needs one modality)",
        )


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
        check(self.devices >= 1, "simulation.devices", "must be >= 1")
        check(self.pool_samples >= 0, "simulation.pool_samples",
               "must be >= 0 (0: every device renders its own streams)")
        check(self.dataset in ("avdigits", "synthetic"), "simulation.dataset", "must be 'avdigits' or 'synthetic'")
        check(self.fps > 0, "simulation.fps", "must be > 0")
        check(self.shot_seconds > 0, "simulation.shot_seconds", "must be > 0")
        check(self.frame_size >= 16, "simulation.frame_size", "must be >= 16")
        check(0.0 <= self.image_noise <= 1.0, "simulation.image_noise", "must be in [0, 1]")
        check(self.speech in ("fill", "once"), "simulation.speech", "must be 'fill' or 'once'")
        check(self.snr_db_spread >= 0, "simulation.snr_db_spread", "must be >= 0")
        check(0.0 <= self.target_accuracy <= 1.0, "simulation.target_accuracy", "must be in [0, 1]")
        check(self.time_budget_s >= 0, "simulation.time_budget_s", "must be >= 0")
        check(self.client_cpus > 0, "simulation.client_cpus", "must be > 0")
        check(self.num_cpus >= 0, "simulation.num_cpus", "must be >= 0")
        check(self.pretrain_steps >= 0, "simulation.pretrain_steps", "must be >= 0")
        check(self.cloud_samples >= 1, "simulation.cloud_samples", "must be >= 1")
        check(self.pretrain_lr > 0, "simulation.pretrain_lr", "must be > 0")


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
        check(self.base_step_s > 0, "profiles.base_step_s", "must be > 0")
        check(self.speed_sigma >= 0, "profiles.speed_sigma", "must be >= 0")
        check(0.0 <= self.straggler_fraction <= 1.0, "profiles.straggler_fraction", "must be in [0, 1]")
        check(self.straggler_slowdown_min >= 1.0, "profiles.straggler_slowdown_min", "must be >= 1")
        check(self.straggler_slowdown_max >= self.straggler_slowdown_min, "profiles.straggler_slowdown_max",
               "must be >= profiles.straggler_slowdown_min")
        check(self.bandwidth_mbps > 0, "profiles.bandwidth_mbps", "must be > 0")
        check(self.bandwidth_sigma >= 0, "profiles.bandwidth_sigma", "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "profiles.dropout", "must be in [0, 1)")
