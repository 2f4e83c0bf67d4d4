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
The same arithmetic is written as an ONNX graph for devices (:mod:`fedge.cloud.experts_onnx`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.common.lora import LoRALinear

__all__ = [
    "ExpertStack",
    "ExpertWeights",
    "expert_slots",
    "expert_softmax",
    "grouped_ffn",
    "moe_dense",
    "moe_topk",
    "stack_experts",
]


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


class ExpertStack:
    """:func:`stack_experts` for a module's forward: restacked on every call while gradients are on (they flow
    back to each expert), and without gradients (inference, evaluation) reused until a weight changes (an
    optimizer step, a loaded state dict or a swapped tensor: each parameter's identity, storage and in-place
    version counter are compared)."""

    def __init__(self) -> None:
        self._layers: tuple[nn.Module, ...] = ()
        self._params: list[nn.Parameter] = []
        self._key: list[tuple[int, int, int]] | None = None
        self._weights: ExpertWeights | None = None

    def __call__(self, experts: nn.ModuleList) -> ExpertWeights:
        if torch.is_grad_enabled():
            return stack_experts(experts)
        # the module walk behind .parameters() costs more than the rest of this check: redo it only when an
        # expert or one of its layers was replaced (e.g. LoRA applied)
        layers = (*experts, *(layer for e in experts for layer in e._modules.values()))
        if len(layers) != len(self._layers) or any(a is not b for a, b in zip(layers, self._layers)):
            self._layers, self._params, self._weights = layers, list(experts.parameters()), None
        key = [(id(p), p.data_ptr(), p._version) for p in self._params]
        if self._weights is None or key != self._key:
            self._weights, self._key = stack_experts(experts), key
        return self._weights

    def __getstate__(self) -> dict[str, object]:
        return {"_layers": (), "_params": [], "_key": None, "_weights": None}  # a copy restacks from its own


def expert_softmax(logits: Tensor) -> Tensor:
    """Softmax of router logits (N, E) over the experts, in float32. Computed along dim 0 of the transpose: the
    same numbers, but torch's CPU softmax over a short last dimension (E = 4..16) is several times slower than
    over a long one, and the router runs on every forward."""
    return logits.float().t().softmax(dim=0).t()


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
    if not flat.numel():
        return flat.clone(), flat.new_ones(0, dtype=torch.bool), 0
    filled = F.one_hot(flat, num_experts).cumsum(0)  # (A, E): each expert's count so far, earlier tokens first
    rank = filled.gather(1, flat.unsqueeze(1)).squeeze(1) - 1  # (A,)
    c = int(filled[-1].max())
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
    dropped = int(keep.numel() - int(keep.sum()))
    if c == 0:
        return x.clone(), dropped
    rows = e_count * c
    # every assignment is copied into its slot; those over capacity land in one spare row, never computed
    dest = torch.where(keep, slot, torch.full_like(slot, rows))
    buf = x.new_zeros(rows + 1, d).index_copy_(0, dest, x.repeat_interleave(k, dim=0))
    y = grouped_ffn(buf[:rows].view(e_count, c, d), w).view(rows, d)
    g = (gates * keep.view(n, k)).to(x.dtype).unsqueeze(-1)  # (N, k, 1): a dropped assignment adds nothing
    return x + (y.index_select(0, slot).view(n, k, d) * g).sum(dim=1), dropped


def moe_dense(x: Tensor, probs: Tensor, w: ExpertWeights) -> Tensor:
    """``x + sum_e probs[:, e] * expert_e(x)`` for every expert: x (N, d), probs (N, E) -> (N, d)."""
    n, d = x.shape
    e_count, _, hidden = w.w1.shape
    p = probs.to(x.dtype)
    w1 = w.w1.permute(1, 0, 2).reshape(d, e_count * hidden)  # (d, E*h)
    h = F.gelu(torch.addmm(w.b1.reshape(-1), x, w1))  # (N, E*h)
    h = (h.view(n, e_count, hidden) * p.unsqueeze(-1)).view(n, e_count * hidden)
    return x + h @ w.w2.reshape(e_count * hidden, d) + p @ w.b2  # (N, d)
