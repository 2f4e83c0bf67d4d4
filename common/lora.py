"""LoRA adapters on the model's expert, head and encoder-projection Linear layers.

Devices train and send only the *adapter state*: the LoRA factors plus the small routing/fusion parameters
(:data:`TRAINABLE_PREFIXES`). The cloud merges aggregated adapters into the base (``W += scale * B @ A``)
and keeps training the base.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "LORA_TARGETS",
    "TRAINABLE_PREFIXES",
    "LoRALinear",
    "adapter_state",
    "apply_lora",
    "base_state",
    "is_adapter_key",
    "load_adapter_state",
    "load_base_state",
    "merge_lora",
    "num_parameters",
]

# Linear layers that get LoRA factors (module-name prefixes inside MultimodalMoE).
LORA_TARGETS: tuple[str, ...] = ("experts.", "head.fc1", "head.fc2", "encoders.image.proj", "encoders.audio.proj")
# Small non-LoRA parameters that devices train directly: they are part of the adapter state.
TRAINABLE_PREFIXES: tuple[str, ...] = ("router.", "fusion_gate.", "modality_heads.", "modality_embed")


class LoRALinear(nn.Module):
    """``y = x W^T + b + scale * (x A^T) B^T`` with frozen W, b and trainable A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ (self.lora_B.t().to(x.dtype) * self.scale)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the adapter into the base weight and zero B, so outputs are unchanged."""
        self.base.weight += self.scale * (self.lora_B @ self.lora_A)
        self.lora_B.zero_()


def _targets(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.startswith(t) for t in targets)


def apply_lora(
    model: nn.Module, *, rank: int = 4, alpha: float = 8.0, targets: tuple[str, ...] = LORA_TARGETS
) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` of ``model`` in a :class:`LoRALinear` (in place) and freeze the base.

    Afterwards only adapter parameters (LoRA factors and :data:`TRAINABLE_PREFIXES`) require grad.
    Deterministic: the A factors are drawn from a generator seeded by ``rank`` so that every party that
    applies LoRA to the same base gets the same adapter initialisation.
    """
    with torch.random.fork_rng():
        torch.manual_seed(1000 + rank)
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and _targets(name, targets):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, LoRALinear(mod, rank=rank, alpha=alpha))
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_key(name)
    return model


def is_adapter_key(name: str) -> bool:
    """Whether a parameter name belongs to the adapter state."""
    return ".lora_A" in name or ".lora_B" in name or name.startswith(TRAINABLE_PREFIXES)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the adapter state (name -> tensor), sorted by name."""
    return {k: v.detach().clone() for k, v in sorted(model.named_parameters()) if is_adapter_key(k)}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor], *, strict: bool = True) -> None:
    """Copy ``state`` into the model's adapter parameters; shapes must match, names must be known."""
    params = dict(model.named_parameters())
    want = {k for k in params if is_adapter_key(k)}
    if strict and set(state) != want:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise KeyError(f"adapter state mismatch: missing={missing[:5]} unexpected={extra[:5]}")
    for k, v in state.items():
        if k not in params:
            raise KeyError(f"unknown adapter key {k!r}")
        if params[k].shape != v.shape:
            raise ValueError(f"adapter {k!r}: shape {tuple(v.shape)} != model {tuple(params[k].shape)}")
        params[k].copy_(v)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA factor into its base weight (in place); outputs are unchanged, B becomes zero."""
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.merge_()
    return model


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The base weights without LoRA factors, under the plain (un-wrapped) module names."""
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if ".lora_A" in k or ".lora_B" in k:
            continue
        out[k.replace(".base.", ".")] = v.detach().clone()
    return out


@torch.no_grad()
def load_base_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load plain base weights (from :func:`base_state`) into a LoRA-wrapped model; adapters untouched."""
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for k in own:
        if ".lora_A" in k or ".lora_B" in k:
            continue
        plain = k.replace(".base.", ".")
        if plain not in state:
            raise KeyError(f"base state lacks {plain!r}")
        mapped[k] = state[plain]
    model.load_state_dict(mapped, strict=False)


def num_parameters(state: dict[str, Tensor]) -> int:
    """Total number of scalars in a state dict."""
    return sum(int(v.numel()) for v in state.values())
