"""Local training and evaluation of the MoE on in-memory arrays (shared by edge, cloud and simulations).

Pure compute: no Flower, no Ray, no disk. Arrays use the layout of :func:`fedge.common.synthetic.make_av_dataset`
(``image``, ``audio``, ``label``, ``mask``, ``quality``); the SampleStore's Dataset yields the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment import augment_batch
from .config import MODALITIES
from .model import MultimodalMoE, fusion_loss

__all__ = ["Arrays", "evaluate", "forward_batch", "local_step_budget", "lr_factor", "modality_dropout",
           "proximal_term", "to_batch", "train_steps"]

Arrays = Mapping[str, np.ndarray]


def to_batch(data: Arrays, idx: np.ndarray | slice) -> dict[str, torch.Tensor]:
    """Index the arrays and turn them into tensors."""
    return {k: torch.as_tensor(np.asarray(data[k][idx])) for k in ("image", "audio", "label", "mask", "quality")}


def modality_dropout(mask: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each present modality with probability p, keeping at least one per sample.

    Training with it teaches the router and fusion to cope with missing modalities.
    """
    if p <= 0:
        return mask
    drop = torch.rand(mask.shape, generator=gen) < p
    new = mask & ~drop
    empty = ~new.any(dim=1)
    new[empty] = mask[empty]
    return new


def forward_batch(model: MultimodalMoE, b: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None):
    """Run the model on a batch dict (inputs of a missing modality are passed but masked)."""
    return model(image=b["image"], audio=b["audio"], mask=b["mask"] if mask is None else mask,
                 quality=b["quality"])


def local_step_budget(num_examples: int, *, local_steps: int, local_epochs: float = 0.0, batch_size: int,
                      grad_accum: int = 1, max_local_steps: int = 0) -> int:
    """Optimizer steps of one local update: ``local_steps``, or enough for ``local_epochs`` passes over the data.

    With ``local_epochs > 0`` a device with more samples does more work: ``ceil(epochs * n / (batch * accum))``
    steps, at least ``local_steps`` (a floor for tiny devices) and at most ``max_local_steps`` when that is > 0.
    """
    if local_epochs <= 0:
        return local_steps
    per_step = max(1, min(batch_size, max(num_examples, 1))) * grad_accum
    steps = max(local_steps, math.ceil(local_epochs * num_examples / per_step))
    return min(steps, max_local_steps) if max_local_steps > 0 else steps


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) of ``steps``: constant, or cosine to 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (known: constant, cosine)")


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedProx's ``(1/2) sum ||w - w0||^2`` over the trained parameters and their received values."""
    return 0.5 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))  # type: ignore[return-value]


def train_steps(
    model: MultimodalMoE,
    data: Arrays,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    modality_dropout_p: float = 0.0,
    aux_weight: float = 0.01,
    grad_accum: int = 1,
    modality_weights: Mapping[str, float] | None = None,
    augment: bool = True,
    lr_schedule: str = "constant",
    prox_mu: float = 0.0,
) -> dict[str, float]:
    """Train the parameters that require grad with Adam for ``steps`` optimizer steps.

    ``modality_weights`` weights each example's loss by the importance of the modalities it carries
    (the brief's importance-weighted gradient accumulation); examples with several modalities take the
    mean of their modalities' weights.
    ``augment`` applies :func:`fedge.common.augment.augment_batch` to every batch (camera framing and light,
    microphone noise, shift and gain, inputs with no class marked unreliable); the loss is
    :func:`fedge.common.fusion.fusion_loss`. ``lr_schedule`` scales the learning rate per step (:func:`lr_factor`).
    ``prox_mu > 0`` adds FedProx's ``mu/2 ||w - w0||^2`` with ``w0`` the trained parameters' values on entry
    (the global weights a device just received), which keeps non-IID devices from drifting apart.

    Returns metrics: mean loss (task + aux, without the proximal term), examples seen, steps.
    """
    n = len(data["label"])
    if n == 0:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, lr_schedule))
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else []
    dev = params[0].device  # batches are cut on the CPU and moved to wherever the model lives
    # fp16 autocast on a GPU needs loss scaling (bf16 does not); disabled, the scaler is a pass-through
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and "fp16" in model.precision.values())
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    mw = torch.tensor([float((modality_weights or {}).get(m, 1.0)) for m in MODALITIES], device=dev)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(grad_accum):
            idx = rng.integers(0, n, size=min(batch_size, n))
            b = to_batch(data, idx)
            if augment:
                b = augment_batch(b, gen)
            mask = modality_dropout(b["mask"], modality_dropout_p, gen).to(dev)
            b = {k: v.to(dev) for k, v in b.items()}
            out = forward_batch(model, b, mask)
            per_ex = fusion_loss(out, b["label"], mask, b.get("reliable"))
            w = (mask.float() * mw).sum(1) / mask.float().sum(1)
            # clamp: a batch whose modalities all weigh 0 contributes no task loss (not a NaN)
            loss = (per_ex * w).sum() / w.sum().clamp_min(1e-12) + aux_weight * out.aux_loss
            total += float(loss.detach()) * len(idx)
            if anchor:
                loss = loss + prox_mu * proximal_term(params, anchor)
            scaler.scale(loss / grad_accum).backward()
            seen += len(idx)
        scaler.step(opt)
        scaler.update()
        sched.step()
    return {"loss": total / max(seen, 1), "examples": float(seen), "steps": float(steps)}


@torch.no_grad()
def evaluate(model: MultimodalMoE, data: Arrays, *, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and loss overall and per modality subset present in ``data`` (keys ``acc-image+audio``...)."""
    model.eval()
    n = len(data["label"])
    if n == 0:
        return {"accuracy": 0.0, "loss": 0.0, "examples": 0.0}
    correct = np.zeros(n, dtype=bool)
    dev = next(model.parameters()).device
    loss = 0.0
    for s in range(0, n, batch_size):
        b = {k: v.to(dev) for k, v in to_batch(data, slice(s, s + batch_size)).items()}
        out = forward_batch(model, b)
        loss += float(F.cross_entropy(out.logits, b["label"], reduction="sum"))
        correct[s : s + batch_size] = (out.logits.argmax(1) == b["label"]).cpu().numpy()
    res = {"accuracy": float(correct.mean()), "loss": loss / n, "examples": float(n)}
    mask = np.asarray(data["mask"], dtype=bool)
    for combo in {tuple(r) for r in mask.tolist()}:
        rows = np.all(mask == np.array(combo), axis=1)
        name = "+".join(m for m, on in zip(MODALITIES, combo) if on)
        res[f"acc-{name}"] = float(correct[rows].mean())
    return res
