"""Trainable scope: which parameters of the (LoRA-wrapped) model devices train and send (``train.scope``).

* ``adapters``: the LoRA factors plus the small routing/fusion parameters (:func:`fedge.common.lora.is_adapter_key`).
  Cheapest on the wire; the base stays frozen, so the federation can only steer what the base already knows.
* ``partial``: the adapters plus every normalisation layer, each modality encoder's last block (its last
  convolution and every parameterised layer after it: projection, norm) and the whole classifier head.
  The layers nearest the decision move, the early feature extractors stay frozen.
* ``full``: every parameter (base weights and LoRA factors alike): small models on devices that can afford it,
  and the scope in which a federation can learn from a randomly initialised base.

The *trainable state* of a scope (name -> tensor, sorted) is what travels in TRAIN messages and, as a delta,
in updates; every party derives the same key set from the same model and scope, so the server validates an
update's keys and shapes against the global state of the run's scope. Pure ``nn.Module`` inspection, no I/O.
"""

from __future__ import annotations

from torch import Tensor, nn

from .lora import is_adapter_key

__all__ = [
    "SCOPES",
    "ScopeError",
    "load_trainable_state",
    "scope_keys",
    "scope_layout",
    "set_trainable",
    "trainable_state",
]

SCOPES: tuple[str, ...] = ("adapters", "partial", "full")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ScopeError(ValueError):
    """A state does not match the scope's keys or shapes (one line naming the first offenders)."""


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"train.scope={scope!r} must be one of {SCOPES}")


def _own_params(prefix: str, mod: nn.Module) -> list[str]:
    return [f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters(recurse=False)]


def _last_block(prefix: str, encoder: nn.Module) -> set[str]:
    """Parameters of an encoder's last convolution and every parameterised module registered after it."""
    leaves = [(f"{prefix}.{n}" if n else prefix, m) for n, m in encoder.named_modules()
              if any(True for _ in m.parameters(recurse=False))]
    convs = [i for i, (_, m) in enumerate(leaves) if isinstance(m, _CONVS)]
    start = convs[-1] if convs else max(len(leaves) - 1, 0)
    return {k for name, m in leaves[start:] for k in _own_params(name, m)}


def scope_keys(model: nn.Module, scope: str) -> set[str]:
    """Names of the parameters ``scope`` trains in ``model`` (a :class:`~fedge.common.model.MultimodalMoE`,
    normally with LoRA applied)."""
    _check_scope(scope)
    names = [n for n, _ in model.named_parameters()]
    if scope == "full":
        return set(names)
    keys = {n for n in names if is_adapter_key(n)}
    if scope == "adapters":
        return keys
    for name, mod in model.named_modules():
        if isinstance(mod, _NORMS):
            keys.update(_own_params(name, mod))
    encoders = getattr(model, "encoders", None)
    if isinstance(encoders, nn.ModuleDict):
        for m, enc in encoders.items():
            keys |= _last_block(f"encoders.{m}", enc)
    keys.update(n for n in names if n.startswith(("head.", "router.")))
    return keys


def set_trainable(model: nn.Module, scope: str) -> nn.Module:
    """Let exactly the parameters of ``scope`` require grad (in place); returns ``model``."""
    keys = scope_keys(model, scope)
    for name, p in model.named_parameters():
        p.requires_grad = name in keys
    return model


def trainable_state(model: nn.Module, scope: str) -> dict[str, Tensor]:
    """A detached copy of the parameters of ``scope`` (name -> tensor), sorted by name."""
    keys = scope_keys(model, scope)
    return {k: v.detach().clone() for k, v in sorted(model.named_parameters()) if k in keys}


def scope_layout(model: nn.Module, scope: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the trainable state of ``scope``: what an update must carry, exactly."""
    keys = scope_keys(model, scope)
    return {k: tuple(v.shape) for k, v in sorted(model.named_parameters()) if k in keys}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], scope: str) -> None:
    """Copy ``state`` into the parameters of ``scope``; its keys must be exactly the scope's, shapes equal.

    Raises
    ------
    ScopeError
        Keys missing or unexpected for the scope (e.g. a state of another scope), or a shape differs.
    """
    import torch

    params = dict(model.named_parameters())
    want = scope_keys(model, scope)
    if set(state) != want:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise ScopeError(f"state does not match train.scope={scope!r}: missing={missing[:3]} "
                         f"unexpected={extra[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ScopeError(f"{k!r}: shape {tuple(v.shape)} != model {tuple(params[k].shape)}")
            params[k].copy_(v)
