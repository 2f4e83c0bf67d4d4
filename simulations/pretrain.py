"""The cloud's base pretraining for a simulation: the full model on the cloud's own curated share.

DESIGN.md: the cloud trains the global base on its curated data and devices load the published base. For a
laptop simulation this is a plain in-process PyTorch warm-up (:func:`common.training.train_steps` on the plain
model: encoders, router, experts, head all train, with modality dropout) before the federated run; the
cluster path is :class:`cloud.training.GlobalTrainer` (Ray Train), which this module does not start.
The result is saved as plain base weights (:func:`common.base_weights.save_base`) that ``model.base_path``
points every party at.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.base_weights import save_base
from common.config import FedgeConfig
from common.model import MultimodalMoE, build_model, model_kwargs
from common.training import evaluate, train_steps

BATCH_SIZE = 32
# each present modality is dropped this often (at least training.modality_dropout): the image path, slower to
# learn than speech, must be trained on its own too, or fusion leans on audio alone
MIN_DROPOUT = 0.5


def base_key(cfg: FedgeConfig) -> dict[str, Any]:
    """Every setting that shapes the pretrained base besides the data (which keys the folder it lives in)."""
    s = cfg.simulation
    return {"steps": s.pretrain_steps, "lr": s.pretrain_lr, "batch": BATCH_SIZE, "seed": cfg.seed,
            "dropout": max(cfg.training.modality_dropout, MIN_DROPOUT), "model": model_kwargs(cfg), "format": 1}


def base_name(cfg: FedgeConfig) -> str:
    """File name of the pretrained base for ``cfg`` inside the prepared-data folder."""
    digest = hashlib.sha256(json.dumps(base_key(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"base-{digest}.safetensors"


def pretrain_base(cfg: FedgeConfig, data: Mapping[str, np.ndarray], *, steps: int) -> MultimodalMoE:
    """The seed's model with every parameter trained for ``steps`` Adam steps on ``data`` (at least :data:`MIN_DROPOUT`)."""
    torch.manual_seed(cfg.seed)
    model = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad = True
    train_steps(model, data, steps=steps, batch_size=BATCH_SIZE, lr=cfg.simulation.pretrain_lr, seed=cfg.seed,
                modality_dropout_p=max(cfg.training.modality_dropout, MIN_DROPOUT))
    model.eval()
    return model


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
