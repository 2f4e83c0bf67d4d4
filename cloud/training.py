"""Global MoE training on Ray Train: merge the aggregated adapters into the base, train, hand a new base back.

The cloud keeps two things for the federation: a **base** (plain weights of :class:`fedge.common.model.MultimodalMoE`)
and the **global adapters** the aggregator produces (LoRA factors + router/fusion parameters, see
common/lora.py). Every ``training.every_versions`` aggregated versions (or on demand) the trainer

1. merges the newest global adapters into the base (``W += scale * B @ A``; router/fusion copied), which
   leaves every output unchanged (:func:`merge_adapters`);
2. trains the whole merged model (encoders, router, experts, head) on curated cloud data with a Ray Train
   ``TorchTrainer`` (DDP over gloo on CPU, NCCL on GPU), with per-modality autocast, gradient accumulation,
   the router's load-balancing loss and top-k routing with a capacity factor (or dense mode);
3. checkpoints every ``fault_tolerance.checkpoint_every`` steps to persistent storage and survives up to
   ``fault_tolerance.max_failures`` worker failures by resuming from the last checkpoint;
4. returns the new base and *fresh adapters* for it (B = 0, so base + fresh adapters == base), which the
   aggregator installs as the next global version (see .coord/NOTES.md for the hook).

The state transforms are :mod:`fedge.cloud.adapters`, the Ray Train worker loop :mod:`fedge.cloud.train_worker`;
this module is the driver side: :class:`GlobalTrainer`, its result, the training data and the aggregator's entry
point (the other modules' public names are re-exported here).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedge.common.config import FedgeConfig
from fedge.common.fsio import append_jsonl
from fedge.common.model import model_kwargs

from .adapters import (
    StateDict,
    TrainingError,
    checked_tensors,
    fresh_adapters,
    initial_base,
    lora_model,
    merge_adapters,
)
from .metrics import MetricsLogger, read_metrics
from .train_worker import (
    CKPT_FILE,
    COLUMNS,
    _shard_arrays,  # noqa: F401 - tests import the worker's helpers from here
    _step_batch,  # noqa: F401
    train_loop_per_worker,
)

__all__ = [
    "GlobalTrainer", "TrainResult", "TrainingError", "arrays_dataset", "fresh_adapters", "initial_base", "lora_model",
    "merge_adapters", "recovery_seconds", "run_global_training", "train_loop_per_worker", "training_dataset",
    "training_due",
]


ZERO_CPU_WORKER_MEMORY = 256 * 2**20  # bytes of Ray's memory resource a worker asks for with cpus_per_worker=0


def training_due(version: int, every_versions: int, last_trained_version: int = 0) -> bool:
    """Whether global training is due at aggregated ``version`` (every N versions; N = 0 means never)."""
    return every_versions > 0 and version - last_trained_version >= every_versions


# ---------------------------------------------------------------------------------------------- driver
def _metrics_callback(log_dir: str) -> Any:
    """A Ray Train callback (runs in the controller) that logs rank 0's reports and worker failures."""
    from ray.train import UserCallback

    class _Log(UserCallback):  # one level of subclassing: Ray's callback interface
        def __init__(self) -> None:
            self.log_dir = log_dir
            self._logger: MetricsLogger | None = None

        def _get(self) -> MetricsLogger:
            if self._logger is None:
                self._logger = MetricsLogger(self.log_dir)
            return self._logger

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                rec = dict(metrics[0])
                rec["checkpoint_path"] = checkpoint.path if checkpoint is not None else ""
                self._get().log(rec)

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            append_jsonl(Path(self.log_dir) / "failures.jsonl",
                         {"time": time.time(), "ranks": sorted(worker_exceptions),
                          "error": repr(next(iter(worker_exceptions.values())))[:500]})

    return _Log()


@dataclass
class TrainResult:
    """What a global training run hands back to the aggregator."""

    base_version: int  # the aggregated version whose adapters were merged into this base
    base_state: dict[str, Tensor]  # the new, trained base (plain weight names)
    adapters: dict[str, Tensor]  # fresh adapters for the new base (B = 0)
    steps: int
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rank 0's reports, in order
    failures: list[dict[str, Any]] = field(default_factory=list)  # worker failures survived
    seconds: float = 0.0
    # per failure: seconds from Ray Train noticing it to the first optimizer step after the restore (a lower
    # bound of kill-to-training: detection takes up to training.health_check_s more)
    recovery_s: list[float] = field(default_factory=list)

    def rebase_args(self) -> tuple[dict[str, np.ndarray], int, dict[str, np.ndarray]]:
        """``(base_state, base_version, adapters)`` as float32 NumPy, the arguments of the aggregator's
        ``rebase(base_state, base_version, adapters=...)``. Pass the adapters: their router and fusion
        parameters come from the trained base, so the initial adapters would not fit it."""
        def np32(d: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
            return {k: v.detach().cpu().float().numpy() for k, v in d.items()}

        return np32(self.base_state), self.base_version, np32(self.adapters)

    def first_loss(self) -> float:
        """Training loss of the first report."""
        return float(self.metrics[0]["loss/train"])

    def last_loss(self) -> float:
        """Training loss of the last report."""
        return float(self.metrics[-1]["loss/train"])


class GlobalTrainer:
    """Ray Train ``TorchTrainer`` around :func:`train_loop_per_worker`; flat keyword-only parameters.

    Parameters
    ----------
    mkw : keyword arguments of :func:`fedge.common.model.build_model` (``model_kwargs(cfg)``); decide dense mode,
        top-k, capacity factor and per-modality precision.
    lora_rank, lora_alpha : the adapters' shape (to merge and to reset them).
    scope : the federation's ``train.scope``: which global state is merged in and handed back fresh.
    workers : Ray Train workers (DDP world size).
    use_gpu : "auto" (a GPU per worker when the cluster has enough), "on" or "off".
    storage_path : persistent storage for checkpoints and metrics (a shared path on a cluster).
    checkpoint_every : steps between checkpoints.
    max_failures : worker-group failures to recover from before giving up.
    """

    def __init__(self, *, mkw: Mapping[str, Any], lora_rank: int, lora_alpha: float, workers: int = 2,
                 use_gpu: str = "auto", cpus_per_worker: float = 1.0, steps: int = 200, batch_size: int = 32,
                 lr: float = 3e-3, grad_accum: int = 1, aux_weight: float = 0.01, modality_dropout: float = 0.2,
                 log_every: int = 10, checkpoint_every: int = 5, max_failures: int = 1,
                 storage_path: str | Path = "runs/train", seed: int = 0, eval_rows: int = 128,
                 health_check_s: float = 0.5, scope: str = "adapters") -> None:
        if use_gpu not in ("auto", "on", "off"):
            raise ValueError(f"use_gpu must be 'auto', 'on' or 'off', got {use_gpu!r}")
        self.mkw = dict(mkw)
        self.lora_rank, self.lora_alpha, self.scope = lora_rank, lora_alpha, scope
        self.workers, self.use_gpu, self.cpus_per_worker = workers, use_gpu, cpus_per_worker
        self.steps, self.batch_size, self.lr, self.grad_accum = steps, batch_size, lr, grad_accum
        self.aux_weight, self.modality_dropout, self.log_every = aux_weight, modality_dropout, log_every
        self.checkpoint_every, self.max_failures = checkpoint_every, max_failures
        self.storage_path = Path(storage_path).resolve()
        self.seed, self.eval_rows, self.health_check_s = seed, eval_rows, health_check_s

    @classmethod
    def from_config(cls, cfg: FedgeConfig, **overrides: Any) -> GlobalTrainer:
        """Build from the run config (``training``, ``fault_tolerance``, ``model``, ``precision``)."""
        t, ft = cfg.training, cfg.fault_tolerance
        storage = t.storage_path or str(Path(cfg.run_dir or "runs") / "train")
        kw: dict[str, Any] = {
            "mkw": model_kwargs(cfg), "lora_rank": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha,
            "scope": cfg.train.scope,
            "workers": t.workers, "use_gpu": t.use_gpu, "cpus_per_worker": t.cpus_per_worker, "steps": t.steps,
            "batch_size": t.batch_size, "lr": t.lr, "grad_accum": t.grad_accum, "aux_weight": t.aux_weight,
            "modality_dropout": t.modality_dropout, "log_every": t.log_every,
            "checkpoint_every": ft.checkpoint_every, "max_failures": ft.max_failures, "storage_path": storage,
            "seed": cfg.seed, "health_check_s": t.health_check_s,
        }
        kw.update(overrides)
        return cls(**kw)

    def _resources(self) -> dict[str, float]:
        """Each worker's Ray resources. ``cpus_per_worker=0`` (workers share CPUs other actors hold, e.g. a
        simulation's nodes): Ray needs some non-zero resource in a bundle, so a little memory instead."""
        if self.cpus_per_worker > 0:
            return {"CPU": self.cpus_per_worker}
        return {"CPU": 0.0, "memory": float(ZERO_CPU_WORKER_MEMORY)}

    def _gpu(self) -> bool:
        import ray

        if self.use_gpu == "on":
            return True
        if self.use_gpu == "off":
            return False
        return float(ray.cluster_resources().get("GPU", 0.0)) >= self.workers

    def train(self, base: StateDict, adapters: StateDict | None, dataset: Any, *, base_version: int,
              name: str | None = None) -> TrainResult:
        """Merge ``adapters`` into ``base``, train on ``dataset`` (a ``ray.data.Dataset`` with the columns
        image, audio, label, mask, quality) and return the new base with fresh adapters.

        Raises
        ------
        TrainingError
            When the states do not fit the model or the run fails more than ``max_failures`` times.
        """
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        merged = (merge_adapters(base, adapters, mkw=self.mkw, rank=self.lora_rank, alpha=self.lora_alpha,
                                 scope=self.scope)
                  if adapters is not None else checked_tensors(base, "base"))
        name = name or f"base-{base_version:06d}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = self.storage_path / name
        run_dir.mkdir(parents=True, exist_ok=True)
        loop_cfg = {
            "model_kwargs": self.mkw, "base_state": merged, "seed": self.seed, "steps": self.steps,
            "batch_size": self.batch_size, "lr": self.lr, "grad_accum": self.grad_accum,
            "aux_weight": self.aux_weight, "modality_dropout": self.modality_dropout,
            "log_every": self.log_every, "checkpoint_every": self.checkpoint_every,
            "run_dir": str(run_dir), "eval_rows": self.eval_rows,
        }
        gpu = self._gpu()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=gpu,
                                         resources_per_worker=self._resources()),
            run_config=RunConfig(
                name=name, storage_path=str(self.storage_path),
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                callbacks=[_metrics_callback(str(run_dir / "metrics"))],
            ),
            datasets={"train": dataset},
        )
        t0 = time.perf_counter()
        # Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default); a
        # worker's report waits for that poll, and a dead worker is noticed only then. Ray propagates the
        # driver's value to the controller, so set it for this fit only.
        env_key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
        prev = os.environ.get(env_key)
        os.environ[env_key] = str(self.health_check_s)
        try:
            result = trainer.fit()
        except Exception as e:  # Ray raises TrainingFailedError subclasses once max_failures is spent
            raise TrainingError(f"global training failed: {type(e).__name__}: {e}") from e
        finally:
            if prev is None:
                os.environ.pop(env_key, None)
            else:
                os.environ[env_key] = prev
        if result.checkpoint is None:
            raise TrainingError("global training produced no checkpoint")
        with result.checkpoint.as_directory() as d:
            st = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)
        new_base = {k: v.detach().cpu() for k, v in st["model"].items()}
        metrics = read_metrics(run_dir / "metrics" / "metrics.jsonl")
        failures = read_metrics(run_dir / "metrics" / "failures.jsonl")
        res = TrainResult(
            base_version=base_version, base_state=new_base,
            adapters=fresh_adapters(new_base, mkw=self.mkw, rank=self.lora_rank, alpha=self.lora_alpha,
                                    scope=self.scope),
            steps=int(st["step"]), run_dir=run_dir, metrics=metrics, failures=failures,
            seconds=time.perf_counter() - t0,
            recovery_s=[recovery_seconds(metrics, float(f["time"])) for f in failures],
        )
        (run_dir / "result.json").write_text(json.dumps({
            "base_version": base_version, "steps": res.steps, "seconds": res.seconds, "workers": self.workers,
            "gpu": gpu, "failures": len(failures), "recovery_s": res.recovery_s,
            "final": {k: v for k, v in (metrics[-1] if metrics else {}).items() if isinstance(v, (int, float))},
        }, indent=2, sort_keys=True))
        return res


def recovery_seconds(metrics: list[dict[str, Any]], kill_time: float) -> float:
    """Seconds from a worker kill at wall time ``kill_time`` to the first optimizer step after the restore.

    Reads rank 0's reports: the first one that says it ``restored_from`` a checkpoint carries the wall
    time of its first step. ``inf`` when no resumed report exists.
    """
    for rec in metrics:
        if rec.get("restored_from", -1) >= 0 and rec.get("first_step_time", 0.0) >= kill_time:
            return float(rec["first_step_time"]) - kill_time
    return math.inf


def run_global_training(cfg: FedgeConfig, base: StateDict | None, adapters: StateDict | None, *,
                        base_version: int, dataset: Any = None, **overrides: Any) -> TrainResult:
    """The aggregator's entry point: one global training run from the config (Ray must be initialised).

    ``base`` None means the deterministic version-0 base; ``dataset`` None means the cloud's own data,
    generated and curated by :func:`fedge.cloud.curation.curate` (``training.samples`` samples).
    """
    trainer = GlobalTrainer.from_config(cfg, **overrides)
    if base is None:
        base = initial_base(trainer.mkw)
    if dataset is None:
        dataset = training_dataset(cfg)
    return trainer.train(base, adapters, dataset, base_version=base_version)


def training_dataset(cfg: FedgeConfig) -> Any:
    """The cloud's training data as a ``ray.data.Dataset`` (Ray must be initialised).

    ``training.data_path`` set: that SampleStore directory or NPZ (the trainer's columns, e.g. a simulation's
    curated cloud share), its labelled samples checked against the model (:func:`fedge.common.dataset.load_data`);
    else ``training.samples`` generated clips curated on Ray Data (:func:`fedge.cloud.curation.cloud_dataset`).

    Raises
    ------
    TrainingError
        The data cannot be read, does not fit the model, or has a label outside the model's classes (one line).
    """
    import ray

    from fedge.common.dataset import DataError, load_data

    path = cfg.training.data_path
    if not path:
        from .curation import cloud_dataset

        return cloud_dataset(cfg)
    m = cfg.model
    try:
        cols = load_data(path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                         num_classes=m.num_classes, what="training.data_path")
    except DataError as e:
        raise TrainingError(str(e)) from None
    n = len(cols["label"])
    return ray.data.from_items([{c: cols[c][i] for c in COLUMNS} for i in range(n)]).materialize()


def arrays_dataset(cols: Mapping[str, np.ndarray]) -> Any:
    """In-memory arrays with the trainer's columns (image, audio, label, mask, quality, equal lengths) as a
    materialized ``ray.data.Dataset`` (Ray must be initialised)."""
    import ray

    return ray.data.from_items([{c: cols[c][i] for c in COLUMNS} for i in range(len(cols["label"]))]).materialize()
