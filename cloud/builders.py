"""Builders that turn the run config into the server's parts: the global model, the held-out set, the aggregator's
keyword arguments, a simulated device's profile, the secure-aggregation groups and the base publisher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.base_weights import load_base_file, published_store
from fedge.common.config import FedgeConfig, TrainConfig
from fedge.common.dataset import load_data
from fedge.common.lora import apply_lora
from fedge.common.manifest import generate_keypair
from fedge.common.model import MultimodalMoE, build_model, model_kwargs
from fedge.common.pki_files import SIGNING_DIR, SIGNING_PRIVATE_KEY

from . import clock as clk
from .aggregation import default_server_lr
from .secure_buffer import SecureGroups

__all__ = ["NO_EVAL", "device_profile", "global_model", "heldout_data", "min_local_steps", "publisher_for",
           "secure_groups", "state_kwargs"]

NO_EVAL = "no evaluation set (data.eval_path is empty): versions are reported without accuracy"


def global_model(cfg: FedgeConfig) -> MultimodalMoE:
    """The global model: the base (the seed's init, or ``model.base_path``) with LoRA applied, as on devices."""
    m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    if cfg.model.base_path:
        load_base_file(m, cfg.model.base_path)
    return m


def heldout_data(cfg: FedgeConfig) -> dict[str, np.ndarray] | None:
    """The held-out evaluation set ``data.eval_path`` (a SampleStore directory or an NPZ), or None without one.

    There is no fallback to generated data: a score on a task the devices do not learn would say nothing.

    Raises
    ------
    fedge.common.dataset.DataError
        The set cannot be read, does not fit the model, or has a label outside the model's classes.
    """
    if not cfg.data.eval_path:
        return None
    m = cfg.model
    return load_data(cfg.data.eval_path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                     num_classes=m.num_classes, what="data.eval_path")


def state_kwargs(cfg: FedgeConfig, ckpt_dir: str | None) -> dict[str, Any]:
    """The keyword arguments of :class:`fedge.cloud.state.AggregatorState` for ``cfg`` (checkpoints in ``ckpt_dir``)."""
    a = cfg.aggregation
    k = a.concurrency if a.mode == "sync" else a.buffer_size  # sync: the round barrier flushes the buffer
    return {"buffer_size": k, "staleness": a.staleness if a.mode == "async" else "constant",
            "staleness_a": a.staleness_a, "staleness_b": a.staleness_b, "max_staleness": a.max_staleness,
            "server_opt": a.server_opt,
            "server_lr": a.server_lr or default_server_lr(a.server_opt, a.beta1), "beta1": a.beta1, "beta2": a.beta2, "tau": a.tau,
            "max_norm": a.max_norm,
            "norm_action": a.norm_action, "robust": a.robust, "trim_ratio": a.trim_ratio,
            "norm_factor": a.norm_factor, "norm_warmup": a.norm_warmup, "examples_factor": a.examples_factor,
            "max_examples": a.max_examples, "window": a.window, "outlier_threshold": a.outlier_threshold,
            "min_cosine": a.min_cosine,
            "replay_window": a.replay_window,
            "checkpoint_dir": ckpt_dir, "checkpoint_every": cfg.fault_tolerance.checkpoint_every}


def device_profile(cfg: FedgeConfig, partition_id: int, num_partitions: int) -> clk.DeviceProfile:
    """The virtual clock's profile of simulated device ``partition_id`` (``profiles.*``)."""
    p = cfg.profiles
    return clk.device_profile(partition_id, num_partitions, seed=cfg.seed, base_step_s=p.base_step_s,
                              speed_sigma=p.speed_sigma, straggler_fraction=p.straggler_fraction,
                              straggler_slowdown_min=p.straggler_slowdown_min,
                              straggler_slowdown_max=p.straggler_slowdown_max,
                              bandwidth_mbps=p.bandwidth_mbps, bandwidth_sigma=p.bandwidth_sigma,
                              dropout=p.dropout)


def min_local_steps(t: TrainConfig) -> int:
    """The fewest optimizer steps a device takes per update (the dispatch-time lower bound of its work)."""
    return min(t.local_steps, t.max_local_steps) if t.local_epochs > 0 and t.max_local_steps > 0 \
        else t.local_steps


def secure_groups(cfg: FedgeConfig, params: dict[str, np.ndarray]) -> SecureGroups | None:
    """The groups of secure aggregation for adapters shaped as ``params``; None without ``aggregation.secure``."""
    agg = cfg.aggregation
    if not agg.secure:
        return None
    n = sum(int(v.size) for v in params.values())
    # every member of a group sends the same random secure_keep of the coordinates (masks cancel only where
    # all send the same ones); what it leaves out waits in its error feedback
    k = max(1, min(n, round(agg.secure_keep * n)))
    return SecureGroups(n=n, k=k, clip=agg.secure_clip, threshold=agg.secure_threshold, levels=agg.secure_levels,
                        adapt_clip=agg.secure_adaptive_clip)


def publisher_for(cfg: FedgeConfig, run_dir: Path | None = None) -> Any:
    """The run's base publisher: ``publish.store`` (default: ``models`` in the run folder) signed with
    ``publish.signing_key`` (default: a key generated in the store's ``.signing`` folder, for one host)."""
    from .publisher import BasePublisher

    root = published_store(store=cfg.publish.store, run_dir=str(run_dir or cfg.run_dir),
                           storage_path=cfg.training.storage_path)
    key = Path(cfg.publish.signing_key) if cfg.publish.signing_key else root / SIGNING_DIR / SIGNING_PRIVATE_KEY
    if not cfg.publish.signing_key and not key.is_file():
        try:
            generate_keypair(key.parent)
        except FileExistsError:  # another process made it first
            pass
    return BasePublisher(root, key, image_size=cfg.model.image_size, audio_frames=cfg.model.audio_frames,
                         onnx=cfg.publish.onnx, deltas=cfg.publish.deltas)
