"""The base and the global adapters as state: the version-0 base, the model devices run (base + adapters), the
adapters folded into the base (outputs unchanged) and fresh adapters for a new base. Pure state transforms, the
first and last step of a global training (:mod:`fedge.cloud.training`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedge.common.lora import apply_lora, base_state, load_base_state, merge_lora
from fedge.common.model import build_model
from fedge.common.scope import ScopeError, load_trainable_state, trainable_state

__all__ = [
    "StateDict",
    "TrainingError",
    "checked_tensors",
    "fresh_adapters",
    "initial_base",
    "lora_model",
    "merge_adapters",
]

StateDict = Mapping[str, Tensor | np.ndarray]


class TrainingError(RuntimeError):
    """Global training could not produce a new base (bad input state, or the run failed for good)."""


def checked_tensors(state: StateDict, what: str) -> dict[str, Tensor]:
    """Copies of a state's tensors (floating ones as float32); :class:`TrainingError` names a non-finite one."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        t = torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v.detach()
        if not bool(torch.isfinite(t).all()):
            raise TrainingError(f"{what} {k!r} holds non-finite values")
        out[k] = t.clone().to(torch.float32) if t.is_floating_point() else t.clone()
    return out


def initial_base(mkw: Mapping[str, Any]) -> dict[str, Tensor]:
    """The deterministic version-0 base every party builds (``build_model(**model_kwargs(cfg))``)."""
    return base_state(build_model(**mkw))


def lora_model(base: StateDict, adapters: StateDict | None, *, mkw: Mapping[str, Any], rank: int,
               alpha: float, scope: str = "adapters") -> torch.nn.Module:
    """The model devices run: ``base`` with LoRA applied and the global state of ``scope`` loaded
    (``adapters``; fresh adapters when None)."""
    m = apply_lora(build_model(**mkw), rank=rank, alpha=alpha)
    try:
        load_base_state(m, checked_tensors(base, "base"))
        if adapters is not None:
            load_trainable_state(m, checked_tensors(adapters, "adapter"), scope)
    except (KeyError, ValueError, RuntimeError, ScopeError) as e:
        raise TrainingError(f"state does not fit the model: {e}") from None
    return m


def merge_adapters(base: StateDict, adapters: StateDict, *, mkw: Mapping[str, Any], rank: int,
                   alpha: float, scope: str = "adapters") -> dict[str, Tensor]:
    """Fold the global state of ``scope`` into the base: the plain weights whose outputs equal base + it."""
    m = lora_model(base, adapters, mkw=mkw, rank=rank, alpha=alpha, scope=scope)
    return base_state(merge_lora(m))


def fresh_adapters(base: StateDict, *, mkw: Mapping[str, Any], rank: int, alpha: float,
                   scope: str = "adapters") -> dict[str, Tensor]:
    """The global state of ``scope`` reset against ``base``: deterministic A, zero B, the rest from the base."""
    return trainable_state(lora_model(base, None, mkw=mkw, rank=rank, alpha=alpha), scope)
