"""Batched expert compute: all experts' FFNs at once over tokens grouped by expert, no per-expert loop.

The experts stay separate modules (``experts.<e>.fc1`` / ``fc2``: checkpoints, LoRA adapters, shards and the
codec address them by those names); a forward stacks their weights into ``(E, ...)`` tensors
(:func:`stack_experts`, differentiable, LoRA factors folded in) and runs

- top-k routing (:func:`moe_topk`): each of the N*k (token, expert) assignments gets a slot in a padded
  ``(E, C, d)`` buffer (C = the fullest expert, or the capacity), one batched matmul per layer over the E
  experts, and the k gated outputs of a token are summed back onto its residual;
- dense mixing (:func:`moe_dense`): every expert on every token as two wide matmuls, ``(N, d) @ (d, E*h)``
  and ``(N, E*h) @ (E*h, d)``, the router probabilities folded in between.

A token's rank inside its expert's group follows token order (a running count over the flat token-major
assignments), so with a capacity the earlier tokens win a full expert and later ones pass on the residual.
The same arithmetic is written as an ONNX graph for devices (:mod:`cloud.experts_onnx`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.lora import LoRALinear


@dataclass(frozen=True)
class ExpertWeights:
    """Stacked expert FFN weights in matmul layout (``x @ w1 + b1``)."""

    w1: Tensor  # (E, d, h)
    b1: Tensor  # (E, h)
    w2: Tensor  # (E, h, d)
    b2: Tensor  # (E, d)

    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])


def _linear_weight(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight (out, in), bias (out,)) of a plain or LoRA-wrapped Linear; LoRA: ``W + scale * B @ A``."""
    if isinstance(layer, LoRALinear):
        base = layer.base
        return base.weight + layer.scale * (layer.lora_B @ layer.lora_A), base.bias
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    raise TypeError(f"an expert layer must be nn.Linear or LoRALinear, not {type(layer).__name__}")


def stack_experts(experts: Iterable[nn.Module]) -> ExpertWeights:
    """Stack the ``fc1``/``fc2`` of each expert (d -> h -> d) into :class:`ExpertWeights` (gradients flow back)."""
    experts = list(experts)
    l1 = [_linear_weight(e.get_submodule("fc1")) for e in experts]
    l2 = [_linear_weight(e.get_submodule("fc2")) for e in experts]
    return ExpertWeights(
        w1=torch.stack([w.t() for w, _ in l1]),
        b1=torch.stack([b for _, b in l1]),
        w2=torch.stack([w.t() for w, _ in l2]),
        b2=torch.stack([b for _, b in l2]),
    )


def grouped_ffn(buf: Tensor, w: ExpertWeights) -> Tensor:
    """Expert e's FFN on its group ``buf[e]``: (E, C, d) -> (E, C, d), one batched matmul per layer."""
    h = F.gelu(torch.baddbmm(w.b1.unsqueeze(1).to(buf.dtype), buf, w.w1.to(buf.dtype)))  # (E, C, h)
    return torch.baddbmm(w.b2.unsqueeze(1).to(buf.dtype), h, w.w2.to(buf.dtype))  # (E, C, d)


def expert_slots(idx: Tensor, num_experts: int, capacity: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Where each assignment goes in the grouped buffer.

    Parameters
    ----------
    idx : (N, k) chosen experts per token (a token picks an expert at most once).
    capacity : most tokens an expert processes (None: unlimited).

    Returns
    -------
    slot : (N*k,) row in the flat (E*C, d) buffer of each token-major assignment (0 where dropped).
    keep : (N*k,) bool, False for assignments past their expert's capacity.
    c : the group size C = min(fullest expert, capacity).
    """
    flat = idx.reshape(-1)  # (A,) token-major: assignment a is token a // k
    onehot = F.one_hot(flat, num_experts)  # (A, E)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # (A,) earlier tokens first within each expert
    c = int(onehot.sum(0).max()) if flat.numel() else 0
    if capacity is not None:
        c = min(c, capacity)
    keep = rank < c
    slot = torch.where(keep, flat * c + rank, torch.zeros_like(flat))
    return slot, keep, c


def moe_topk(x: Tensor, idx: Tensor, gates: Tensor, w: ExpertWeights,
             *, capacity: int | None = None) -> tuple[Tensor, int]:
    """The MoE residual ``x + sum_k gates[:, k] * expert_{idx[:, k]}(x)`` computed grouped by expert.

    x : (N, d); idx, gates : (N, k). Returns (out (N, d), assignments dropped over capacity).
    """
    n, k = idx.shape
    d, e_count = x.shape[1], w.num_experts
    slot, keep, c = expert_slots(idx, e_count, capacity)
    tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (A,)
    kept = keep.nonzero(as_tuple=True)[0]
    buf = x.new_zeros(e_count * c, d).index_copy(0, slot[kept], x.index_select(0, tok[kept]))  # (E*C, d)
    y = grouped_ffn(buf.view(e_count, c, d), w).reshape(e_count * c, d)
    g = (gates.reshape(-1) * keep).to(x.dtype)  # (A,): a dropped assignment adds nothing
    mixed = (y.index_select(0, slot) * g.unsqueeze(-1)).view(n, k, d).sum(dim=1) if c else x.new_zeros(n, d)
    return x + mixed, int(idx.numel() - kept.numel())


def moe_dense(x: Tensor, probs: Tensor, w: ExpertWeights) -> Tensor:
    """``x + sum_e probs[:, e] * expert_e(x)`` for every expert: x (N, d), probs (N, E) -> (N, d)."""
    n, d = x.shape
    e_count, _, hidden = w.w1.shape
    p = probs.to(x.dtype)
    w1 = w.w1.permute(1, 0, 2).reshape(d, e_count * hidden)  # (d, E*h)
    h = F.gelu(torch.addmm(w.b1.reshape(-1), x, w1))  # (N, E*h)
    h = (h.view(n, e_count, hidden) * p.unsqueeze(-1)).view(n, e_count * hidden)
    return x + h @ w.w2.reshape(e_count * hidden, d) + p @ w.b2  # (N, d)
