"""Evaluate a global model (base + adapters) on held-out arrays: fused and with one modality only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from common.base_weights import load_base_file
from common.config import MODALITIES, FedgeConfig
from common.lora import apply_lora, load_adapter_state
from common.model import MultimodalMoE, build_model, model_kwargs
from common.training import evaluate

ADAPTERS = "global_adapters.npz"


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays saved with ``np.savez`` (image, audio, label, mask, quality)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def model_with(cfg: FedgeConfig, adapters: Mapping[str, np.ndarray] | None) -> MultimodalMoE:
    """The base model of ``cfg`` (seed init or ``model.base_path``) with LoRA, loaded with ``adapters`` (initial ones if None)."""
    m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    if cfg.model.base_path:
        load_base_file(m, cfg.model.base_path)
    if adapters is not None:
        load_adapter_state(m, {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in adapters.items()})
    return m


def only(arrays: Mapping[str, np.ndarray], modality: str) -> dict[str, np.ndarray]:
    """The samples that carry ``modality``, with every other modality masked out."""
    j = MODALITIES.index(modality)
    rows = np.asarray(arrays["mask"], dtype=bool)[:, j]
    out = {k: np.asarray(v)[rows] for k, v in arrays.items()}
    mask = np.zeros_like(out["mask"], dtype=bool)
    mask[:, j] = True
    out["mask"] = mask
    return out


def fused(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The samples that carry every modality."""
    rows = np.asarray(arrays["mask"], dtype=bool).all(axis=1)
    return {k: np.asarray(v)[rows] for k, v in arrays.items()}


def modality_accuracy(model: MultimodalMoE, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accuracy with both modalities (``image+audio``) and with each one alone (``image``, ``audio``)."""
    res = {}
    both = fused(arrays)
    if len(both["label"]):
        res["image+audio"] = evaluate(model, both)["accuracy"]
    for m in MODALITIES:
        sub = only(arrays, m)
        if len(sub["label"]):
            res[m] = evaluate(model, sub)["accuracy"]
    return res
