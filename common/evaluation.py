"""How well a global model classifies labelled data: overall, per modality subset, per class, confusion matrix.

Pure compute over arrays (layout of :mod:`fedge.common.training`) plus :func:`model_with`, which builds the global
model every party holds (the base, LoRA applied, adapters loaded). ``fedge evaluate`` (:mod:`fedge.common.evaluate_cli`)
and the simulation report use it.

The subsets: ``accuracy`` uses each sample's own modalities (its mask as stored); ``image+audio`` the samples
that carry both, with both; ``image`` and ``audio`` the samples that carry that modality, with it alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .base_weights import load_base_file
from .config import MODALITIES, FedgeConfig
from .lora import apply_lora
from .model import MultimodalMoE, build_model, model_kwargs
from .scope import load_trainable_state
from .training import forward_batch, to_batch

__all__ = ["SUBSETS", "confusion_matrix", "evaluation_report", "fused", "model_with", "only", "predict"]

SUBSETS = ("image+audio", "image", "audio")


def model_with(cfg: FedgeConfig, adapters: Mapping[str, Any] | None, *,
               base_path: str | None = None) -> MultimodalMoE:
    """The base of ``cfg`` (the seed's init, or ``base_path`` / ``model.base_path``) with LoRA, loaded with
    ``adapters`` (the initial, output-neutral ones if None)."""
    m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    base = cfg.model.base_path if base_path is None else base_path
    if base:
        load_base_file(m, base)
    if adapters is not None:  # the global state of the run's train.scope (the adapters, or more)
        load_trainable_state(m, {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in adapters.items()},
                             cfg.train.scope)
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


@torch.no_grad()
def predict(model: MultimodalMoE, data: Mapping[str, np.ndarray], *, batch_size: int = 256) -> np.ndarray:
    """Predicted class per sample, (N,) int64, with each sample's own modalities (its mask)."""
    model.eval()
    n = len(data["label"])
    dev = next(model.parameters()).device
    out = np.zeros(n, np.int64)
    for s in range(0, n, batch_size):
        b = {k: v.to(dev) for k, v in to_batch(data, slice(s, s + batch_size)).items()}
        out[s:s + batch_size] = forward_batch(model, b).logits.argmax(1).cpu().numpy()
    return out


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(label, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def evaluation_report(model: MultimodalMoE, data: Mapping[str, np.ndarray], *,
                      num_classes: int) -> dict[str, Any]:
    """Accuracy overall (each sample's own modalities) and per subset (None where no sample qualifies), per
    class (its recall; None for a class without samples) and the confusion matrix.

    Returns
    -------
    ``{"n", "accuracy", "image+audio", "image", "audio", "subset_n": {subset: n}, "per_class": [{"label",
    "n", "accuracy"}], "confusion": [[...]]}``.
    """
    label = np.asarray(data["label"], np.int64)
    n = len(label)
    pred = predict(model, data)
    rep: dict[str, Any] = {"n": n, "accuracy": float((pred == label).mean()) if n else None}
    subsets = {"image+audio": fused(data), **{m: only(data, m) for m in MODALITIES}}
    rep["subset_n"] = {}
    for name in SUBSETS:
        sub = subsets[name]
        k = len(sub["label"])
        rep["subset_n"][name] = k
        rep[name] = float((predict(model, sub) == sub["label"]).mean()) if k else None
    cm = confusion_matrix(label, pred, num_classes)
    rep["per_class"] = [{"label": c, "n": int(cm[c].sum()),
                         "accuracy": float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None}
                        for c in range(num_classes)]
    rep["confusion"] = cm.tolist()
    return rep
