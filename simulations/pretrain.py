"""The cloud's base pretraining for a simulation: the full model on the cloud's own curated share.

DESIGN.md: the cloud trains the global base on its curated data and devices load the published base. A simulation
does it the way a deployment does, on Ray Train (:class:`fedge.cloud.training.GlobalTrainer`: encoders, router, experts,
head all train, with modality dropout), with one worker: on a laptop's few CPUs more DDP workers only share them.
It joins the Ray this process already runs (a test session's), or starts one for the pretraining and stops it, so
that the simulation engine's own Ray starts afterwards with the run's environment.
The result is saved as plain base weights (:func:`fedge.common.base_weights.save_base`) that ``model.base_path``
points every party at. :func:`pretrain_base` takes the data as in-memory arrays: whatever names the cloud's data
loads it and hands it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.base_weights import save_base
from fedge.common.config import FedgeConfig
from fedge.common.model import MultimodalMoE, build_model, model_kwargs
from fedge.common.training import evaluate

__all__ = ["BATCH_SIZE", "MIN_DROPOUT", "base_key", "base_name", "ensure_base", "pretrain_base"]

BATCH_SIZE = 32
# each present modality is dropped this often (at least training.modality_dropout): the image path, slower to
# learn than speech, must be trained on its own too, or fusion leans on audio alone
MIN_DROPOUT = 0.5


def base_key(cfg: FedgeConfig) -> dict[str, Any]:
    """Every setting that shapes the pretrained base besides the data (which keys the folder it lives in)."""
    s = cfg.simulation
    return {"steps": s.pretrain_steps, "lr": s.pretrain_lr, "batch": BATCH_SIZE, "seed": cfg.seed,
            "dropout": max(cfg.training.modality_dropout, MIN_DROPOUT), "model": model_kwargs(cfg),
            "trainer": "ray-train", "format": 2}


def base_name(cfg: FedgeConfig) -> str:
    """File name of the pretrained base for ``cfg`` inside the prepared-data folder."""
    digest = hashlib.sha256(json.dumps(base_key(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"base-{digest}.safetensors"


def pretrain_base(cfg: FedgeConfig, data: Mapping[str, np.ndarray], *, steps: int,
                  storage: str | Path | None = None) -> MultimodalMoE:
    """The seed's model with every parameter trained for ``steps`` Adam steps on ``data`` on Ray Train
    (one worker; modality dropout at least :data:`MIN_DROPOUT`). ``storage``: where Ray Train keeps the run
    (a temporary folder, removed after, when None)."""
    import ray

    from fedge.cloud.training import GlobalTrainer, arrays_dataset, initial_base

    mkw = model_kwargs(cfg)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(1, min(os.cpu_count() or 1, 4)), include_dashboard=False, log_to_driver=False)
    tmp = tempfile.TemporaryDirectory(prefix="fedge-pretrain-") if storage is None else None
    try:
        trainer = GlobalTrainer.from_config(
            cfg, workers=1, cpus_per_worker=_cpus_per_worker(), steps=steps, batch_size=BATCH_SIZE,
            lr=cfg.simulation.pretrain_lr, grad_accum=1,
            modality_dropout=max(cfg.training.modality_dropout, MIN_DROPOUT), log_every=max(steps // 5, 1),
            checkpoint_every=steps, max_failures=1, storage_path=str(storage or tmp.name),  # type: ignore[union-attr]
        )
        res = trainer.train(initial_base(mkw), None, arrays_dataset(data), base_version=0, name="pretrain")
    finally:
        if tmp is not None:
            tmp.cleanup()
        if started:
            ray.shutdown()
    model = build_model(**mkw)  # type: ignore[arg-type]
    model.load_state_dict(res.base_state)
    model.eval()
    return model


def _cpus_per_worker() -> float:
    """One CPU for the worker when the cluster has one free, else share (a test session's busy Ray)."""
    import ray

    return 1.0 if float(ray.available_resources().get("CPU", 0.0)) >= 1.0 else 0.0


def ensure_base(cfg: FedgeConfig, data_dir: Path, cloud: Mapping[str, np.ndarray],
                heldout: Mapping[str, np.ndarray] | None = None) -> Path:
    """The pretrained base for ``cfg`` in ``data_dir`` (trained and saved once, reused after)."""
    path = data_dir / base_name(cfg)
    if not path.is_file():
        model = pretrain_base(cfg, cloud, steps=cfg.simulation.pretrain_steps)
        save_base(model, path)
        info: dict[str, Any] = {"key": base_key(cfg), "cloud_samples": len(cloud["label"]),
                                "cloud_accuracy": evaluate(model, dict(cloud))["accuracy"]}
        if heldout is not None:
            info["heldout_accuracy"] = evaluate(model, dict(heldout))["accuracy"]
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return path
