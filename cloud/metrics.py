"""Per-modality training metrics of the MoE (loss, accuracy, expert load, router entropy) and their sinks.

The numerics are pure functions over a batch and a :class:`fedge.common.model.MoEOutput`; :class:`MetricsLogger`
writes flat ``name -> float`` records as JSONL lines and TensorBoard scalars (``loss/image`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedge.common.config import MODALITIES
from fedge.common.fsio import append_jsonl, read_jsonl
from fedge.common.model import MoEOutput, MultimodalMoE

__all__ = ["MetricsLogger", "modality_eval", "read_metrics", "routing_stats", "token_modalities"]

# Keys whose value is not a scalar to plot (identifiers, wall-clock times).
_NOT_PLOTTED = ("step", "time", "attempt")


def token_modalities(mask: Tensor) -> Tensor:
    """Modality index of each present token, in the order the model routes them.

    Parameters
    ----------
    mask : (B, M) bool.

    Returns
    -------
    (N,) int64 with N = mask.sum(); the model flattens tokens sample-major, modality-minor.
    """
    b, m = mask.shape
    ids = torch.arange(m, device=mask.device).expand(b, m)
    return ids.reshape(-1)[mask.reshape(-1)]


def routing_stats(out: MoEOutput, mask: Tensor, num_experts: int) -> dict[str, float]:
    """Expert load and router entropy per modality for one forward pass.

    ``load/<m>/e<i>`` is the fraction of modality m's expert assignments that went to expert i (sums to 1
    over i); ``router_entropy/<m>`` the mean entropy (nats) of the router distribution over m's tokens, and
    ``load_max/<m>`` the busiest expert's share (1/E when balanced).
    """
    mods = token_modalities(mask)
    probs = out.router_probs.detach().float()
    idx = out.topk_idx.detach()
    res: dict[str, float] = {}
    for j, m in enumerate(MODALITIES):
        sel = mods == j
        if not bool(sel.any()):
            continue
        counts = torch.bincount(idx[sel].reshape(-1), minlength=num_experts).float()
        load = counts / counts.sum().clamp_min(1.0)
        for e in range(num_experts):
            res[f"load/{m}/e{e}"] = float(load[e])
        res[f"load_max/{m}"] = float(load.max())
        p = probs[sel].clamp_min(1e-12)
        res[f"router_entropy/{m}"] = float(-(p * p.log()).sum(-1).mean())
    return res


@torch.no_grad()
def modality_eval(model: MultimodalMoE, batch: Mapping[str, Tensor]) -> dict[str, float]:
    """Loss and accuracy of the model given one modality only (``loss/image``...) and all present ones.

    Each single-modality figure uses the samples that carry that modality, with the other masked out, so
    it says how well the model does on that modality alone; ``loss/all`` and ``accuracy/all`` use every
    present modality.
    """
    was_training = model.training
    model.eval()
    mask = batch["mask"].to(torch.bool)
    res: dict[str, float] = {}
    variants: list[tuple[str, Tensor, Tensor]] = [("all", mask, torch.ones(len(mask), dtype=torch.bool))]
    for j, m in enumerate(MODALITIES):
        only = torch.zeros_like(mask)
        only[:, j] = mask[:, j]
        variants.append((m, only, mask[:, j]))
    for name, vmask, rows in variants:
        if not bool(rows.any()):
            continue
        out = model(image=batch["image"][rows], audio=batch["audio"][rows], mask=vmask[rows],
                    quality=batch["quality"][rows])
        y = batch["label"][rows]
        res[f"loss/{name}"] = float(F.cross_entropy(out.logits.float(), y))
        res[f"accuracy/{name}"] = float((out.logits.argmax(1) == y).float().mean())
    model.train(was_training)
    return res


class MetricsLogger:
    """Append metric records to ``<log_dir>/metrics.jsonl`` and to TensorBoard event files in ``log_dir``.

    Parameters
    ----------
    log_dir : directory for both sinks (created).
    tensorboard : also write TensorBoard scalars.
    """

    def __init__(self, log_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.log_dir / "metrics.jsonl"
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (needs an integer ``step``); non-finite and non-numeric values are not plotted."""
        if "step" not in record:
            raise ValueError("metric record needs a 'step'")
        step = int(record["step"])
        append_jsonl(self.jsonl, record, sort_keys=True)
        if self._tb is None:
            return
        for k, v in record.items():
            if k in _NOT_PLOTTED or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(float(v)):
                self._tb.add_scalar(k, float(v), step)
        self._tb.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a :class:`MetricsLogger` file, in order (empty when the file does not exist; a line torn by a
    crash is skipped).

    Global training's step records, not the federation's run log: that has its own ``metrics.jsonl`` contract,
    :mod:`fedge.common.run_log`.
    """
    return read_jsonl(path)
