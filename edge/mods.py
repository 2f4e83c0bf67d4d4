"""Cross-cutting client behaviour as Flower mods: differential privacy, update compression, size accounting.

The TRAIN handler (:mod:`fedge.edge.client_app`) replies with the *float* adapter delta in an edge-internal
``ArrayRecord`` (:data:`RAW_DELTA`) next to ``wire.UPDATE`` (base version only) and ``wire.METRICS``. On the
way out the reply passes, innermost first::

    train handler -> dp_mod (clip + Gaussian noise) -> compression_mod (codec + error feedback) -> size_mod

``compression_mod`` replaces the raw record by the codec payload in ``wire.UPDATE[wire.DELTA]``, so what
leaves the device is exactly the wire format of :mod:`fedge.common.wire`. DP comes before compression: the
codec and its error-feedback residual only ever see noised values (post-processing keeps the guarantee).
Every mod is a pass-through for messages without a raw delta (EVALUATE, error replies).

All three have Flower's mod signature ``(Message, Context, call_next) -> Message`` (:data:`Mod`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedge.common import codec, wire
from fedge.common.config import config_from_context

from . import node_state
from .node_config import parse_node_config
from .privacy import add_gaussian_noise, clip_update, gaussian_epsilon

__all__ = ["DP_STATE", "RAW_DELTA", "RESIDUAL", "Mod", "compression_mod", "dp_mod", "size_mod"]

log = logging.getLogger("fedge.edge")

RAW_DELTA = "raw-delta"  # edge-internal: the float delta between the train handler and the mods; never sent
RESIDUAL = "ef-residual"  # error-feedback residual in the node's Context.state across rounds
DP_STATE = "dp-state"  # Context.state ConfigRecord: releases so far
_RELEASES = "releases"


def _arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return wire.record_to_adapters(rec)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in sorted(arrays)})


def dp_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip the update to ``dp.clip`` (L2, all tensors together) and add ``N(0, (dp.noise_multiplier*clip)^2)``.

    Off when ``dp.clip`` is 0. Noise comes from the OS entropy pool, never from the round seed (which the
    server knows). Counts releases in Context.state (and the node's state dir, so a restart does not reset
    the account) and reports the noise std and the device's cumulative epsilon at ``dp.delta``.
    """
    reply = call_next(msg, ctxt)
    if reply.has_error() or RAW_DELTA not in reply.content:
        return reply
    dp = config_from_context(ctxt.run_config).dp
    if dp.clip <= 0:
        return reply
    node = parse_node_config(ctxt.node_config)
    delta, _ = clip_update(_arrays(reply.content.array_records[RAW_DELTA]), dp.clip)
    std = dp.noise_multiplier * dp.clip
    if std > 0:
        delta = add_gaussian_noise(delta, std, np.random.default_rng())
    reply.content[RAW_DELTA] = _record(delta)

    releases = 0
    if DP_STATE in ctxt.state:
        releases = int(ctxt.state.config_records[DP_STATE][_RELEASES])  # type: ignore[arg-type]
    elif node.state_path is not None:
        saved = node_state.load_json(node.state_path / node_state.PRIVACY_FILE)
        releases = int(saved[_RELEASES]) if saved else 0
    releases += 1
    ctxt.state[DP_STATE] = ConfigRecord({_RELEASES: releases})
    if node.state_path is not None:
        node_state.save_json(node.state_path / node_state.PRIVACY_FILE,
                             {_RELEASES: releases, "noise_multiplier": dp.noise_multiplier, "delta": dp.delta})
    metrics = reply.content.metric_records[wire.METRICS]
    metrics[wire.DP_NOISE_STD] = float(std)
    if std > 0:
        metrics[wire.DP_EPSILON] = gaussian_epsilon(releases, dp.noise_multiplier, dp.delta)
    return reply


def _load_residual(ctxt: Context, node_state_dir: Path | None) -> dict[str, np.ndarray] | None:
    if RESIDUAL in ctxt.state:
        return _arrays(ctxt.state.array_records[RESIDUAL])
    if node_state_dir is not None:
        saved = node_state.load_arrays(node_state_dir / node_state.RESIDUAL_FILE)
        if saved is not None:
            return saved[0]
    return None


def compression_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Encode the raw delta with the codec (top-k + quantization, error feedback) into ``wire.UPDATE``.

    The residual lives in Context.state across rounds and, when the node has a state directory, on disk
    (atomically), so a restarted device carries its error feedback on. A residual whose keys or shapes no
    longer match the delta (the model changed) is dropped.
    """
    reply = call_next(msg, ctxt)
    if reply.has_error() or RAW_DELTA not in reply.content:
        return reply
    cfg = config_from_context(ctxt.run_config)
    node = parse_node_config(ctxt.node_config)
    comm = cfg.communication
    params = codec.CodecParams(
        topk_ratio=comm.topk_ratio if comm.compression == "topk" else 1.0,
        bits=comm.quant_bits, error_feedback=comm.error_feedback,
    )
    delta = _arrays(reply.content.array_records[RAW_DELTA])
    residual = _load_residual(ctxt, node.state_path) if comm.error_feedback else None
    if residual is not None and (set(residual) != set(delta)
                                 or any(residual[k].shape != delta[k].shape for k in delta)):
        log.warning("error-feedback residual does not match the adapters (model changed): starting afresh")
        residual = None
    payload, new_residual = codec.encode(delta, params, residual)
    if comm.error_feedback:
        ctxt.state[RESIDUAL] = _record(new_residual)
        if node.state_path is not None:
            node_state.save_arrays(node.state_path / node_state.RESIDUAL_FILE, new_residual)
    del reply.content[RAW_DELTA]
    reply.content.config_records[wire.UPDATE][wire.DELTA] = payload
    reply.content.metric_records[wire.METRICS][wire.RAW_BYTES] = float(codec.raw_nbytes(delta))
    return reply


def size_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Account bytes: the adapters received and the payload sent, as metrics and in the node's ledger.

    The ledger (``updates.jsonl`` in the node's state dir) gets one line per update sent: device, base
    version, bytes up and down, raw bytes, examples, loss, train seconds, wall time.
    """
    down = msg.content.array_records[wire.ARRAYS].count_bytes() if wire.ARRAYS in msg.content else 0
    reply = call_next(msg, ctxt)
    if reply.has_error() or wire.METRICS not in reply.content:
        return reply
    metrics = reply.content.metric_records[wire.METRICS]
    metrics[wire.DOWNLOAD_BYTES] = float(down)
    update = reply.content.config_records.get(wire.UPDATE)
    if update is None or wire.DELTA not in update:
        return reply
    up = len(update[wire.DELTA])  # type: ignore[arg-type]
    metrics[wire.UPLOAD_BYTES] = float(up)
    node = parse_node_config(ctxt.node_config)
    if node.state_path is not None:
        line = {"device": node.name, "time": time.time(), "base_version": int(update[wire.BASE_VERSION])}  # type: ignore[arg-type]
        line.update({k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
        node_state.append_jsonl(node.state_path / node_state.UPDATES_FILE, line)
    return reply
