"""The shared multimodal mixture-of-experts: per-modality encoders, a quality-aware top-k router, experts, head.

Pure ``nn.Module`` code (no I/O, no config parsing): entry points build it with flat keyword arguments.

Data flow for a batch of B samples and M modalities (order: :data:`fedge.common.config.MODALITIES`)::

    image (B, 3, S, S) --ImageEncoder--> (B, d) \
    audio (B, n_mels, T) --AudioEncoder--> (B, d) -> tokens (B, M, d), mask (B, M), quality (B, M)
    present tokens (N, d), N = mask.sum()  --router--> top-k experts per token --> (N, d)
    fusion: softmax over the present modalities of a quality-aware gate --> (B, d) --head--> fused (B, C)
    each present routed token --its modality's head--> (B, C); output: confidence-weighted product of
    the fused and per-modality distributions (:func:`fuse`) --> logits (B, C)

A missing modality is a mask: its encoder does not run and its token takes part in neither routing nor
fusion (never a zero tensor pretending to be data).

Expert affinity (``expert_affinity``): ``"shared"`` (default) lets every token route to any of the E experts.
``"modality"`` is a hierarchical layout: the experts are partitioned into one private group per modality
(image: experts ``0..g-1``, audio: ``g..2g-1``) plus ``shared_experts`` experts at the end that every modality
may use; the router's logits outside a token's group are masked to ``-inf`` before the softmax and the top-k, so a
token only ever reaches its own group (see :func:`expert_groups`). A device that has only some modalities then
needs only those groups' experts. In dense mode with modality affinity every token mixes all the experts of its
group (softmax over the group), not all E.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedge.common.config import MODALITIES
from fedge.common.experts import ExpertStack, expert_softmax, moe_dense, moe_topk
from fedge.common.fusion import RELIABILITY_FLOOR, conflict, fuse, fusion_loss, reliability

__all__ = [
    "AFFINITIES",
    "MODALITIES",
    "RELIABILITY_FLOOR",
    "AudioEncoder",
    "Expert",
    "Head",
    "ImageEncoder",
    "MoEOutput",
    "ModalityHead",
    "MultimodalMoE",
    "Router",
    "autocast_for",
    "build_model",
    "conflict",
    "expert_groups",
    "fuse",
    "fusion_loss",
    "iter_expert_linears",
    "load_balancing_loss",
    "model_kwargs",
    "reliability",
    "top_k_gating",
]

AFFINITIES: tuple[str, ...] = ("shared", "modality")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MoEOutput:
    """What :meth:`MultimodalMoE.forward` returns."""

    logits: Tensor  # (B, C)
    aux_loss: Tensor  # () Switch load-balancing loss (0 in dense mode and without gradients)
    expert_counts: Tensor  # (E,) tokens dispatched to each expert
    topk_idx: Tensor  # (N, k) experts chosen per present token (all E in dense mode)
    router_probs: Tensor  # (N, E)
    fusion_weights: Tensor  # (B, M) weight of each modality in the fused vector (0 where missing)
    dropped_tokens: int = 0  # tokens over an expert's capacity (pass through on the residual)
    fused_logits: Tensor | None = None  # (B, C) the fused head's own logits
    modality_logits: Tensor | None = None  # (B, M, C) each modality's own head (meaningless where missing)


def autocast_for(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager[None]:
    """Autocast context for one modality's precision ('fp32' disables autocast)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


class ImageEncoder(nn.Module):
    """Keyframe encoder: (B, 3, S, S) in [0, 1] -> (B, d).

    Three stride-2 stages bring S to S/8; the (B, 4w, 4, 4) grid is then flattened, so the projection sees
    *where* the strokes are (a digit's identity lies in its layout: a global average over the grid threw that
    away and cost ~10 points of accuracy against a plain small CNN on the same keyframes,
    ``benchmarks/image_path.py``). Inputs other than 32 px are pooled to the same 4x4 grid.
    """

    GRID = 4

    def __init__(self, *, dim: int, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width * 2, width * 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.proj = nn.Linear(width * 4 * self.GRID * self.GRID, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - 0.5) / 0.25
        h = self.conv(x)  # (B, 4w, S/8, S/8)
        if h.shape[-1] != self.GRID or h.shape[-2] != self.GRID:
            h = F.adaptive_avg_pool2d(h, self.GRID)
        return self.norm(self.proj(h.flatten(1)))  # (B, 4w*16) -> (B, d)


class AudioEncoder(nn.Module):
    """Log-mel encoder: (B, n_mels, T) in dB -> (B, d). Per-example standardisation makes it gain-invariant."""

    def __init__(self, *, dim: int, n_mels: int, width: int = 64) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.proj = nn.Linear(width, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(dim=(1, 2), keepdim=True)
        sd = x.std(dim=(1, 2), keepdim=True).clamp_min(1e-3)
        h = self.conv((x - mu) / sd).mean(dim=2)  # (B, w)
        return self.norm(self.proj(h))


class Expert(nn.Module):
    """One FFN expert: d -> hidden -> d."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Router(nn.Module):
    """Scores experts from a token, its modality and its quality signal: (N, d), (N,) -> (N, E) logits."""

    def __init__(self, *, dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim + 1, num_experts)

    def forward(self, tokens: Tensor, quality: Tensor) -> Tensor:
        return self.gate(torch.cat([tokens, quality.unsqueeze(-1)], dim=-1))


class Head(nn.Module):
    """Classifier over the fused vector: (B, d) -> (B, C)."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class ModalityHead(nn.Module):
    """One modality's own classifier over its routed token: (B, d) -> (B, C)."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


def load_balancing_loss(probs: Tensor, topk_idx: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i`` generalised to top-k.

    Parameters
    ----------
    probs : (N, E) router softmax probabilities.
    topk_idx : (N, k) chosen experts.

    ``f_i`` is the fraction of the N*k assignments that went to expert i, ``P_i`` the mean probability of i.
    It equals 1 for a perfectly uniform router and grows as routing collapses.
    """
    n, k = topk_idx.shape
    if n == 0:
        return probs.sum() * 0.0
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones(n * k, device=probs.device, dtype=probs.dtype))
    f = counts / (n * k)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def top_k_gating(logits: Tensor, k: int, allowed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax router with top-k selection; gates renormalised over the chosen k (Shazeer et al.).

    Parameters
    ----------
    logits : (N, E) router scores.
    k : experts per token.
    allowed : optional (N, E) bool, True where a token may use an expert (modality affinity). Logits outside are
        set to ``-inf`` before the softmax, so their probability is exactly 0, and the top-k is taken over the
        masked logits, so a token never selects a disallowed expert (even when in-group probabilities underflow).
        Each row needs at least ``k`` allowed experts.

    Returns (probs (N, E), topk_idx (N, k), gates (N, k)).
    """
    if allowed is None:
        probs = expert_softmax(logits)
        top_p, top_i = probs.topk(k, dim=-1)
    else:
        masked = logits.float().masked_fill(~allowed, float("-inf"))
        probs = expert_softmax(masked)
        top_i = masked.topk(k, dim=-1).indices
        top_p = probs.gather(-1, top_i)
    gates = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    return probs, top_i, gates


def expert_groups(
    num_experts: int, *, affinity: str = "shared", shared_experts: int = 0
) -> dict[str, tuple[int, ...]]:
    """The experts each modality's tokens may route to, in :data:`MODALITIES` order.

    ``"shared"``: every modality may use all experts (``shared_experts`` must be 0). ``"modality"``: the first
    ``num_experts - shared_experts`` experts are split into equal consecutive private groups, one per modality,
    and the last ``shared_experts`` experts join every group.

    Raises
    ------
    ValueError
        Unknown affinity, or the private experts do not split evenly into one non-empty group per modality.
    """
    if affinity not in AFFINITIES:
        raise ValueError(f"expert_affinity={affinity!r} must be one of {AFFINITIES}")
    if affinity == "shared":
        if shared_experts != 0:
            raise ValueError("shared_experts needs expert_affinity='modality' (with 'shared' every expert is shared)")
        return {m: tuple(range(num_experts)) for m in MODALITIES}
    private = num_experts - shared_experts
    if shared_experts < 0 or private < len(MODALITIES) or private % len(MODALITIES):
        raise ValueError(
            f"expert_affinity='modality' needs num_experts - shared_experts ({num_experts} - {shared_experts}) to be "
            f"a positive multiple of the {len(MODALITIES)} modalities"
        )
    g = private // len(MODALITIES)
    shared = tuple(range(private, num_experts))
    return {m: (*range(j * g, (j + 1) * g), *shared) for j, m in enumerate(MODALITIES)}


class MultimodalMoE(nn.Module):
    """The fedge model: encoders per modality, quality-aware top-k router over E experts, fusion, head."""

    expert_allowed: Tensor  # (M, E) bool buffer: modality m's tokens may use expert e

    def __init__(
        self,
        *,
        dim: int = 64,
        num_experts: int = 4,
        top_k: int = 2,
        expert_hidden: int = 128,
        num_classes: int = 10,
        n_mels: int = 40,
        capacity_factor: float = 0.0,
        dense: bool = False,
        precision: dict[str, str] | None = None,
        expert_affinity: str = "shared",
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        groups = expert_groups(num_experts, affinity=expert_affinity, shared_experts=shared_experts)
        group_size = min(len(g) for g in groups.values())
        if top_k > group_size:
            raise ValueError(f"top_k={top_k} must be <= the {group_size} experts of a modality's group")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.capacity_factor, self.dense = capacity_factor, dense
        self.expert_affinity, self.shared_experts = expert_affinity, shared_experts
        self.groups = groups
        # (M, E) True where modality m's tokens may use expert e; not in the state dict (derived from the shape)
        allowed = torch.zeros(len(MODALITIES), num_experts, dtype=torch.bool)
        for j, m in enumerate(MODALITIES):
            allowed[j, list(groups[m])] = True
        self.register_buffer("expert_allowed", allowed, persistent=False)
        self.precision = {m: "fp32" for m in MODALITIES} | dict(precision or {})
        self.encoders = nn.ModuleDict(
            {"image": ImageEncoder(dim=dim), "audio": AudioEncoder(dim=dim, n_mels=n_mels)}
        )
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), dim))
        self.router = Router(dim=dim, num_experts=num_experts)
        self.experts = nn.ModuleList([Expert(dim=dim, hidden=expert_hidden) for _ in range(num_experts)])
        self._expert_weights = ExpertStack()  # stacked expert weights, reused while no gradients are needed
        self.fusion_gate = nn.Linear(dim + 1, 1)
        self.head = Head(dim=dim, num_classes=num_classes)
        self.modality_heads = nn.ModuleDict({m: ModalityHead(dim=dim, num_classes=num_classes) for m in MODALITIES})

    @property
    def experts_per_token(self) -> int:
        """Experts each token mixes: ``top_k``, or in dense mode every expert it may use (E, or its group's)."""
        if not self.dense:
            return self.top_k
        return min(len(g) for g in self.groups.values())

    # ------------------------------------------------------------------ pieces
    def encode(self, inputs: dict[str, Tensor | None], mask: Tensor) -> Tensor:
        """Run each modality's encoder only on the samples that have it. Returns tokens (B, M, d)."""
        b = mask.shape[0]
        tokens = torch.zeros(b, len(MODALITIES), self.dim, device=mask.device)
        for j, m in enumerate(MODALITIES):
            present = mask[:, j]
            x = inputs.get(m)
            if x is None or not bool(present.any()):
                continue
            with autocast_for(self.precision[m], mask.device.type):
                z = self.encoders[m](x[present])
            tokens[present, j] = z.float()
        return tokens + self.modality_embed.unsqueeze(0)

    def route(
        self, x: Tensor, q: Tensor, modality: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Mixture of experts over present tokens x (N, d) with quality q (N,).

        ``modality`` (N,) int64 is each token's index in :data:`MODALITIES`; required with modality affinity
        (it selects the token's expert group), ignored with shared experts.

        Returns (out (N, d), aux_loss, probs (N, E), topk_idx (N, k), dropped tokens). In dense mode topk_idx
        lists every expert a token mixes: all E (shared) or its group's (modality affinity).
        """
        n = x.shape[0]
        logits = self.router(x, q)
        if self.expert_affinity == "modality":
            if modality is None:
                raise ValueError("route needs each token's modality index with expert_affinity='modality'")
            return self._route_grouped(x, logits, self.expert_allowed[modality.to(torch.long)], modality)
        if self.dense:
            probs = expert_softmax(logits)
            out = moe_dense(x, probs, self._expert_weights(self.experts))
            idx = torch.arange(self.num_experts, device=x.device).expand(n, -1)
            return out, x.new_zeros(()), probs, idx, 0
        probs, idx, gates = top_k_gating(logits, self.top_k)
        return self._dispatch(x, probs, idx, gates)

    def _route_grouped(
        self, x: Tensor, logits: Tensor, allowed: Tensor, modality: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Modality affinity: top-k (or dense: all of the group) over the experts ``allowed`` (N, E) per token."""
        if self.dense:
            groups = torch.tensor([self.groups[m] for m in MODALITIES], device=x.device)  # (M, G): equal sizes
            idx = groups[modality.to(torch.long)]  # (N, G): every expert of the token's group
            probs = expert_softmax(logits.masked_fill(~allowed, float("-inf")))
            w = self._expert_weights(self.experts)
            out, _ = moe_topk(x, idx, probs.gather(1, idx), w)  # group-sized groups
            return out, x.new_zeros(()), probs, idx, 0
        probs, idx, gates = top_k_gating(logits, self.top_k, allowed)
        return self._dispatch(x, probs, idx, gates)

    def _dispatch(
        self, x: Tensor, probs: Tensor, idx: Tensor, gates: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Send each token to its chosen experts (capacity-limited, batched by expert) and add the gated outputs."""
        n = x.shape[0]
        # the balancing loss only matters to training: without gradients (inference, evaluation) it is 0
        aux = load_balancing_loss(probs, idx, self.num_experts) if torch.is_grad_enabled() else x.new_zeros(())
        capacity = None  # unlimited
        if self.capacity_factor > 0:
            capacity = max(1, math.ceil(self.capacity_factor * n * self.top_k / self.num_experts))
        out, dropped = moe_topk(x, idx, gates, self._expert_weights(self.experts), capacity=capacity)
        return out, aux, probs, idx, dropped

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: Tensor | None = None,
        audio: Tensor | None = None,
        mask: Tensor | None = None,
        quality: Tensor | None = None,
    ) -> MoEOutput:
        """Classify a batch in which each sample has any non-empty subset of modalities.

        Parameters
        ----------
        image : (B, 3, S, S) or None.
        audio : (B, n_mels, T) or None.
        mask : (B, M) bool, True where the sample has that modality; derived from which inputs are given
            when omitted.
        quality : (B, M) in [0, 1], per-modality quality from the quality gate (1 = clean); 1 when omitted.
        """
        ref = image if image is not None else audio
        if ref is None:
            raise ValueError("MultimodalMoE needs at least one modality input")
        b, dev = ref.shape[0], ref.device
        if mask is None:
            mask = torch.stack(
                [torch.full((b,), x is not None, device=dev, dtype=torch.bool) for x in (image, audio)], 1
            )
        mask = mask.to(torch.bool)
        if image is None:
            mask = mask & torch.tensor([False, True], device=dev)
        if audio is None:
            mask = mask & torch.tensor([True, False], device=dev)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one present modality (mask row all False)")
        if quality is None:
            quality = torch.ones(b, len(MODALITIES), device=dev)
        quality = quality.to(torch.float32)

        tokens = self.encode({"image": image, "audio": audio}, mask)  # (B, M, d)
        present = mask.reshape(-1)
        x = tokens.reshape(-1, self.dim)[present]  # (N, d)
        q = quality.reshape(-1)[present]  # (N,)
        mod = torch.arange(len(MODALITIES), device=dev).expand(b, -1).reshape(-1)[present]  # (N,)
        y, aux, probs, idx, dropped = self.route(x, q, mod)

        routed = tokens.new_zeros(b * len(MODALITIES), self.dim)
        routed[present] = y
        routed = routed.view(b, len(MODALITIES), self.dim)
        logits, w, fused, per = fuse(routed, quality, mask, fusion_gate=self.fusion_gate, head=self.head,
                                     modality_heads=self.modality_heads)
        counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        return MoEOutput(
            logits=logits,
            fused_logits=fused,
            modality_logits=per,
            aux_loss=aux,
            expert_counts=counts,
            topk_idx=idx,
            router_probs=probs,
            fusion_weights=w,
            dropped_tokens=dropped,
        )


def build_model(*, seed: int = 0, **kwargs: Any) -> MultimodalMoE:
    """Build the model with deterministic initial weights for ``seed`` (every party builds the same base).

    ``kwargs`` are :class:`MultimodalMoE`'s keyword arguments (``dim``, ``num_experts``, ``top_k``, ...).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MultimodalMoE(**kwargs)


def model_kwargs(cfg: object) -> dict[str, object]:
    """Flat keyword arguments for :func:`build_model` from a :class:`fedge.common.config.FedgeConfig`."""
    m = cfg.model  # type: ignore[attr-defined]
    p = cfg.precision  # type: ignore[attr-defined]
    return {
        "dim": m.dim,
        "num_experts": m.num_experts,
        "top_k": m.top_k,
        "expert_hidden": m.expert_hidden,
        "num_classes": m.num_classes,
        "n_mels": m.n_mels,
        "capacity_factor": m.capacity_factor,
        "dense": m.dense,
        "precision": {"image": p.image, "audio": p.audio},
        "expert_affinity": m.expert_affinity,
        "shared_experts": m.shared_experts,
        "seed": cfg.seed,  # type: ignore[attr-defined]
    }


def iter_expert_linears(model: MultimodalMoE) -> Iterator[tuple[str, nn.Linear]]:
    """Names and modules of the Linear layers inside experts (for FLOP counting and LoRA)."""
    for name, mod in model.experts.named_modules():
        if isinstance(mod, nn.Linear):
            yield f"experts.{name}", mod
