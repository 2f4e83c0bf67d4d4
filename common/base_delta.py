"""Training shards as bytes, and a new base delivered as a compressed delta against the base a device holds.

A training shard is a safetensors file of float tensors under the model's parameter names. Its bytes are a pure
function of its tensors and its shard name (:func:`shard_bytes`: no version, no time in the metadata), so a shard
that did not change between two bases has the same sha256 and is never downloaded twice.

Delta delivery uses the update codec (:mod:`fedge.common.codec`, dense int8 with one scale per tensor: a quarter of
the fp32 bytes). It is exact by construction: the cloud publishes the *reconstruction* ``old + decode(delta)``
as the new base (:func:`snap_to_delta`), so a device that applies the delta to the shard it holds
(:func:`apply_delta`) gets the published tensors bit for bit; the sha256 of the rebuilt file, compared with the
full shard's signed hash, proves it. Quantizing the *change* costs the base at most half a quantization step of
that change per weight. Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .codec import CodecParams, decode, encode

__all__ = ["DELTA_CODEC", "DeltaError", "apply_delta", "read_shard", "same_layout", "shard_bytes", "snap_to_delta"]

DELTA_CODEC = CodecParams(topk_ratio=1.0, bits=8, error_feedback=False)


class DeltaError(ValueError):
    """A delta does not fit the shard it is applied to."""


def shard_bytes(state: Mapping[str, np.ndarray], name: str) -> bytes:
    """The safetensors bytes of training shard ``name`` (deterministic: the same tensors, the same bytes)."""
    from safetensors.numpy import save

    return bytes(save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"shard": name}))


def read_shard(data: bytes) -> dict[str, np.ndarray]:
    """Tensors of a training shard's bytes."""
    from safetensors.numpy import load

    return dict(load(data))


def same_layout(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> bool:
    """Whether a delta from ``old`` to ``new`` exists: the same tensor names, shapes and float32 dtype."""
    return set(old) == set(new) and all(
        old[k].shape == new[k].shape and old[k].dtype == np.float32 and new[k].dtype == np.float32 for k in new)


def snap_to_delta(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    """Encode ``new - old`` and return (delta payload, the tensors a device rebuilds from it).

    The second value is what the cloud publishes as the new shard; :func:`apply_delta` on ``old`` gives it
    exactly.

    Raises
    ------
    DeltaError
        ``old`` and ``new`` differ in names, shapes or dtype.
    """
    if not same_layout(old, new):
        raise DeltaError("a delta needs the same float32 tensors in the old and the new shard")
    diff = {k: np.asarray(new[k], np.float32) - np.asarray(old[k], np.float32) for k in new}
    payload, _ = encode(diff, DELTA_CODEC)
    return payload, apply_delta(old, payload)


def apply_delta(old: Mapping[str, np.ndarray], payload: bytes) -> dict[str, np.ndarray]:
    """``old + decode(payload)``, tensor by tensor, in float32.

    Raises
    ------
    fedge.common.codec.CodecError
        The payload is corrupt or declares other tensors than ``old`` holds.
    """
    step = decode(payload, expected={k: v.shape for k, v in old.items()})
    return {k: (np.asarray(old[k], np.float32) + step[k].astype(np.float32)).astype(np.float32) for k in old}
