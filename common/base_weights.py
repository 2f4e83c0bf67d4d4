"""A published base model: plain weights in a safetensors file (``model.base_path``), shared by every party.

The cloud trains the global base on its own curated data and publishes it; the ClientApp and the ServerApp both
load it (after :func:`fedge.common.lora.apply_lora`), so devices train adapters on the very base the server evaluates.
With ``model.base_path = ""`` the base stays the deterministic init from the seed (:func:`fedge.common.model.build_model`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .fsio import atomic_path
from .lora import load_base_state

__all__ = ["BaseWeightsError", "load_base_file", "published_store", "read_base", "save_base"]

# path -> (mtime_ns, size, state): one read per process and file version
_CACHE: dict[str, tuple[int, int, dict[str, Tensor]]] = {}


class BaseWeightsError(ValueError):
    """A base file that is missing or does not fit the configured model (one line)."""


def read_base(path: str | Path) -> dict[str, Tensor]:
    """The plain base weights in ``path`` (safetensors), cached per process by path and modification time.

    Raises
    ------
    BaseWeightsError
        The file is missing or not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = str(Path(path).resolve())
    try:
        st = os.stat(p)
    except OSError:
        raise BaseWeightsError(f"model.base_path: base weights file {path} not found") from None
    hit = _CACHE.get(p)
    if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
        return hit[2]
    try:
        state = load_file(p)
    except (SafetensorError, OSError, ValueError) as e:
        raise BaseWeightsError(f"model.base_path: {path} is not a safetensors file ({e})") from None
    _CACHE[p] = (st.st_mtime_ns, st.st_size, state)
    return state


@torch.no_grad()
def load_base_file(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the plain base weights in ``path`` into ``model`` (LoRA-wrapped or plain; adapters untouched).

    Raises
    ------
    BaseWeightsError
        The file is missing, lacks a weight of the model, or a weight's shape differs from the model's.
    """
    state = read_base(path)
    own = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
           if ".lora_A" not in k and ".lora_B" not in k}
    missing = sorted(set(own) - set(state))
    if missing:
        raise BaseWeightsError(f"model.base_path: {path} lacks {len(missing)} weights of the model "
                               f"(e.g. {missing[0]!r}); was it saved for another model config?")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise BaseWeightsError(f"model.base_path: {path}: {k!r} has shape {tuple(state[k].shape)}, the model "
                                   f"{tuple(v.shape)}; was it saved for another model config?")
    if any(".lora_A" in k for k in model.state_dict()):
        load_base_state(model, {k: state[k] for k in own})
    else:
        model.load_state_dict({k: state[k] for k in own}, strict=False)
    return model


def save_base(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s plain base weights (LoRA factors left out, un-wrapped names) to ``path`` atomically."""
    from safetensors.torch import save_file

    from .lora import base_state

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in base_state(model).items()}, str(tmp))
    return path


def published_store(*, store: str, run_dir: str, storage_path: str) -> Path:
    """The model store root that bases are published into (``publish.store``; by default ``models`` in the run
    folder, else in ``training.storage_path``, else ``runs/train``): the aggregator writes it, a simulation's
    devices read it in place."""
    if store:
        return Path(store)
    return Path(run_dir or storage_path or "runs/train") / "models"
