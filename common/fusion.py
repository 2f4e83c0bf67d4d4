"""Late fusion that does not trust a broken modality: per-modality reliability, conflict between modalities,
the confidence-pooled output (:func:`fuse`) and its training loss (:func:`fusion_loss`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.common.config import MODALITIES

if TYPE_CHECKING:
    from fedge.common.model import MoEOutput

__all__ = ["RELIABILITY_FLOOR", "conflict", "fuse", "fusion_loss", "reliability"]

RELIABILITY_FLOOR = 1e-4  # keeps log(reliability) finite: a useless modality's gate weight is scaled by 1e-4


def reliability(logits: Tensor) -> Tensor:
    """Confidence of a classifier's distribution: 1 - entropy / log C, in [0, 1]. (..., C) -> (...).

    1 for a one-hot prediction, 0 for a uniform one: a head that cannot read its input (noise, an unseen
    voice it was taught to doubt) says so by spreading its probability, and its vote then counts for little.
    """
    logp = logits.float().log_softmax(dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    return (1.0 - ent / math.log(logits.shape[-1])).clamp(0.0, 1.0) ** 2


def conflict(per: Tensor, mask: Tensor) -> Tensor:
    """How strongly the present modalities' own heads contradict each other: (B, M, C), (B, M) -> (B,) in [0, 1].

    ``min_m r_m * (1 - BC)``: BC is the Bhattacharyya coefficient of their distributions,
    ``sum_c prod_m p_m(c) ** (1 / n)`` over the ``n`` present modalities (1 when they say the same), and
    ``r_m`` their :func:`reliability`. A conflict needs every head to be sure: two confident heads naming
    different classes give ~1; one unsure head (noise, silence) or a single present modality give 0.
    """
    mk = mask.float()
    n = mk.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    logp = per.float().log_softmax(dim=-1) * mk.unsqueeze(-1)  # a missing modality contributes log 1
    bc = torch.logsumexp(logp.sum(dim=1) / n, dim=-1).exp().clamp(0.0, 1.0)
    sure = reliability(per).masked_fill(~mask, 1.0).amin(dim=1)
    return sure * (1.0 - bc)


def fuse(
    routed: Tensor,
    quality: Tensor,
    mask: Tensor,
    *,
    fusion_gate: nn.Module,
    head: nn.Module,
    modality_heads: nn.ModuleDict,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fusion that does not trust a broken modality: a fused head and one head per modality, pooled by confidence.

    Parameters
    ----------
    routed : (B, M, d) routed tokens (anything where missing: never read there).
    quality : (B, M) quality-gate scores in [0, 1].
    mask : (B, M) bool, True where present; every row has one.

    1. Each modality's own head classifies its token alone: ``per`` (B, M, C), and its :func:`reliability`
       ``r_m`` says how sure it is.
    2. The quality-aware gate mixes the present tokens (softmax over them; exactly 0 where missing) into one
       vector that the head classifies: ``fused`` (B, C). Each gate weight is multiplied by ``r_m`` (added as
       ``log r_m`` to the score), so a modality that cannot be read hardly enters the fused vector.
    3. The output is a confidence-weighted log-linear pool (a weighted product of experts) of the fused and
       the present modalities' distributions: ``sum_j r_j * log p_j`` with ``r_j`` = :func:`reliability`
       (0 for a missing modality). A modality whose head is unsure (trained with noisy and dropped inputs,
       it learns to be) barely moves the result, so a broken input cannot outvote a clean one, while two
       agreeing inputs sharpen each other. The fused head's weight is also scaled by ``1 -`` the
       :func:`conflict` of the modalities' own heads: the joint head learned how far to trust each input on
       the training data, so it speaks where the inputs do not contradict each other; where two confident
       inputs conflict (speech in a language the audio path never heard, a camera pointed elsewhere), each
       modality's head answers for itself and the surer one decides.

    Returns (logits (B, C), fusion weights (B, M), fused logits (B, C), per-modality logits (B, M, C)).
    """
    per = torch.stack([modality_heads[m](routed[:, j]) for j, m in enumerate(MODALITIES)], dim=1)  # (B, M, C)
    r_mod = reliability(per).detach()  # (B, M)
    score = fusion_gate(torch.cat([routed, quality.unsqueeze(-1)], dim=-1)).squeeze(-1)  # (B, M)
    score = score.float() + torch.log(r_mod.clamp_min(RELIABILITY_FLOOR))  # the gate's weight times reliability
    w = score.masked_fill(~mask, float("-inf")).softmax(dim=1)  # (B, M): exactly 0 where missing
    fused = head(torch.einsum("bm,bmd->bd", w.to(routed.dtype), routed))  # (B, C)
    votes = torch.cat([fused.unsqueeze(1), per], dim=1).float()  # (B, 1+M, C)
    trust_fused = reliability(fused).detach() * (1.0 - conflict(per, mask).detach())
    r = torch.cat([trust_fused.unsqueeze(1), r_mod * mask.float()], dim=1)  # (B, 1+M)
    logits = (r.unsqueeze(-1) * votes.log_softmax(dim=-1)).sum(dim=1)  # (B, C)
    return logits, w, fused, per


def fusion_loss(out: MoEOutput, label: Tensor, mask: Tensor, reliable: Tensor | None = None) -> Tensor:
    """Per-example training loss of :func:`fuse`'s outputs: (B,).

    Cross-entropy of the pooled output, of the fused head and the mean over the present modalities of each
    modality's own head. The heads must each be right (and calibrated) on their own, or their confidence
    would not say how far to trust them. ``reliable`` (B, M), 0 where an input was replaced by one that holds
    no class (:func:`fedge.common.augment.augment_batch`): that modality's head is trained towards the uniform
    distribution instead (outlier exposure), so it learns to answer "I cannot tell".
    """
    ce = F.cross_entropy(out.logits, label, reduction="none")
    if out.fused_logits is None or out.modality_logits is None:
        return ce
    ce = ce + F.cross_entropy(out.fused_logits, label, reduction="none")
    b, m = out.modality_logits.shape[:2]
    logp = out.modality_logits.float().log_softmax(dim=-1)  # (B, M, C)
    right = -logp.gather(-1, label.view(b, 1, 1).expand(b, m, 1)).squeeze(-1)  # (B, M)
    if reliable is not None:
        r = reliable.to(logp.dtype)
        right = r * right + (1.0 - r) * -logp.mean(dim=-1)  # CE against the uniform distribution
    mk = mask.float()
    return ce + (right * mk).sum(1) / mk.sum(1).clamp_min(1.0)
