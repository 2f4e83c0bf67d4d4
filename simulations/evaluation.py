"""Evaluate a global model (base + adapters) on held-out arrays: fused and with one modality only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.common.config import MODALITIES
from fedge.common.evaluation import fused, model_with, only
from fedge.common.model import MultimodalMoE
from fedge.common.training import evaluate

__all__ = ["ADAPTERS", "fused", "load_arrays", "modality_accuracy", "model_with", "only"]

ADAPTERS = "global_adapters.npz"


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays saved with ``np.savez`` (image, audio, label, mask, quality)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


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
