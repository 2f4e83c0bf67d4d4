"""The edge ClientApp (Flower Message API): trains the model's trainable scope locally, replies with a compressed delta.

TRAIN: load the global state of the run's ``train.scope`` and its version from the message (the adapters:
LoRA factors, router, fusion gate, modality embeddings; or more, see :mod:`fedge.common.scope`), train it on this
device's samples for a step budget that may scale with them (``train.local_epochs``), with the configured
learning-rate schedule and FedProx term, per-modality autocast precision and modality-importance-weighted
gradient accumulation, and reply with the float delta.
The mods (:mod:`fedge.edge.mods`) turn that reply into the wire format: DP, codec + error feedback, byte accounting.
EVALUATE: accuracy of the received adapters on this device's local evaluation split, overall and per
modality subset. QUERY: the node's simulation partition id, so that a simulated run dispatches by partition.

The same app runs under Flower's simulation engine (node config ``partition-id``) and in a real SuperNode
(node config ``store``; see :mod:`fedge.edge.node_config`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.common import wire
from fedge.common.base_weights import load_base_file, published_store
from fedge.common.config import MODALITIES, FedgeConfig, config_from_context
from fedge.common.lora import apply_lora, base_state
from fedge.common.model import MultimodalMoE, build_model, model_kwargs
from fedge.common.scope import load_trainable_state, set_trainable, trainable_state
from fedge.common.training import evaluate, local_step_budget, train_steps

from . import node_state
from .base_fetch import HttpSource, ShardSource, StoreSource, fetch_base
from .data import PARTITION_ID, local_data, modality_counts
from .mods import RAW_DELTA, compression_mod, dp_mod, size_mod
from .node_config import NodeConfig, parse_node_config, resolve_device, resolve_precision
from .secagg_mod import handle_query, secagg_mod

__all__ = [
    "MAX_MODELS",
    "TOKEN_ENV",
    "app",
    "base_source",
    "device_setup",
    "evaluate_",
    "get_model",
    "query",
    "round_config",
    "train",
]

log = logging.getLogger("fedge.edge")
TOKEN_ENV = "FEDGE_SHARD_TOKEN"  # the device's download token (a secret: never in a config)

# size accounting wraps every handler; DP and compression only concern TRAIN replies (outermost first)
app = ClientApp(mods=[size_mod])
_MODELS: dict[str, MultimodalMoE] = {}
MAX_MODELS = 2  # models kept per process (a global training switches bases; runs may differ in config)


def device_setup(cfg: FedgeConfig, node: NodeConfig) -> tuple[torch.device, dict[str, str]]:
    """Where this node trains and the per-modality precision it can run there."""
    dev = resolve_device(node.profile, cuda_available=torch.cuda.is_available())
    bf16_ok = dev != "cuda" or torch.cuda.is_bf16_supported()
    prec = resolve_precision({"image": cfg.precision.image, "audio": cfg.precision.audio}, dev, bf16_ok=bf16_ok)
    return torch.device(dev), prec


def get_model(cfg: FedgeConfig, node: NodeConfig | None = None) -> MultimodalMoE:
    """The base model with LoRA applied, on the node's device, built once per process and config.

    The base is deterministic from the config seed, or the published base weights in ``model.base_path``
    (:mod:`fedge.common.base_weights`), so every party holds the same frozen weights and only adapter states travel.
    """
    node = node or NodeConfig()
    dev, prec = device_setup(cfg, node)
    kwargs = {**model_kwargs(cfg), "precision": prec}
    base = cfg.model.base_path
    stamp = os.stat(base).st_mtime_ns if base and os.path.exists(base) else 0
    key = repr((kwargs, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.train.scope, str(dev), base, stamp))
    torch.set_num_threads(node.threads)
    if key not in _MODELS:
        while len(_MODELS) >= MAX_MODELS:  # e.g. the base before a global training: oldest out
            _MODELS.pop(next(iter(_MODELS)))
        m = build_model(**kwargs)  # type: ignore[arg-type]
        apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
        if base:
            load_base_file(m, base)
        set_trainable(m, cfg.train.scope)
        _MODELS[key] = m.to(dev)
    return _MODELS[key]


_SOURCES: dict[tuple[str, ...], tuple[ShardSource, Path]] = {}


def base_source(cfg: FedgeConfig, node: NodeConfig) -> tuple[ShardSource, Path]:
    """Where this node fetches published bases, and the folder it keeps the rebuilt base files in.

    A device with ``shards-url`` in its node config: its shard server over HTTPS, with its pinned key, CA,
    cache folder and ``FEDGE_SHARD_TOKEN``. Otherwise (a simulation on the publisher's host): the model store
    read in place. One source per process, so the cache's statistics and manifests carry over between rounds.
    """
    if node.shards_url:
        cache = Path(node.shards_cache) if node.shards_cache else (
            (node.state_path or Path.home() / ".cache" / "fedge") / "shards")
        key: tuple[str, ...] = ("http", node.shards_url, str(cache), node.shards_public_key)
        if key not in _SOURCES:
            src: ShardSource = HttpSource(
                node.shards_url, cache, public_key=node.shards_public_key, modalities=node.modalities,
                budget_bytes=int(node.shards_budget_mb * (1 << 20)), token=os.environ.get(TOKEN_ENV) or None,
                device=node.device_id or node.name, ca_file=node.shards_ca or None, timeout=cfg.shards.timeout_s,
                retry_s=cfg.shards.retry_s)
            _SOURCES[key] = (src, cache / "bases")
        return _SOURCES[key]
    root = published_store(store=cfg.publish.store, run_dir=cfg.run_dir, storage_path=cfg.training.storage_path)
    key = ("store", str(root.resolve()), cfg.shards.public_key)
    if key not in _SOURCES:
        _SOURCES[key] = (StoreSource(root, public_key=cfg.shards.public_key or None), root / ".device-bases")
    return _SOURCES[key]


def round_config(cfg: FedgeConfig, msg: Message, node: NodeConfig | None = None) -> FedgeConfig:
    """The run config with the base the message's version belongs to (global training may have replaced it).

    The message names a published base (a model store version); the node fetches the training shards it
    needs (:func:`fedge.edge.base_fetch.fetch_base`: held, rebuilt from a delta, or downloaded) and trains on it.
    """
    rnd = msg.content.config_records.get(wire.ROUND)
    if rnd is None:
        return cfg
    version = str(rnd.get(wire.BASE_MODEL, ""))
    if not version:
        return cfg
    node = node or NodeConfig()
    source, out = base_source(cfg, node)
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_path=""))
    report = fetch_base(source, version, node.modalities, out,
                        fill=lambda: base_state(build_model(**model_kwargs(plain))))  # type: ignore[arg-type]
    if report.held >= 0:
        log.info("device %s: base %s fetched (%d held, %d from deltas, %d whole; %d bytes downloaded)",
                 node.name, version, report.held, report.from_delta, report.full, report.downloaded_bytes)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_path=str(report.path)))


def _load_global(model: MultimodalMoE, msg: Message, scope: str) -> dict[str, np.ndarray]:
    state = wire.record_to_adapters(msg.content.array_records[wire.ARRAYS])
    dev = next(model.parameters()).device
    load_trainable_state(model, {k: torch.from_numpy(v).to(dev) for k, v in state.items()}, scope)
    return state


@app.train(mods=[compression_mod, secagg_mod, dp_mod])
def train(msg: Message, context: Context) -> Message:
    """TRAIN: train the adapters from the received global version; reply with the float delta and metrics."""
    node = parse_node_config(context.node_config)
    cfg = round_config(config_from_context(context.run_config), msg, node)
    rnd = msg.content.config_records[wire.ROUND]
    version = int(rnd[wire.VERSION])  # type: ignore[arg-type]
    model = get_model(cfg, node)
    global_state = _load_global(model, msg, cfg.train.scope)
    data = local_data(cfg, node, "train")
    n = len(data["label"])
    if n == 0:
        raise ValueError(f"device {node.name}: no training samples with modalities {node.modalities} yet")

    batch_size = int(rnd[wire.BATCH_SIZE])  # type: ignore[arg-type]
    steps = local_step_budget(n, local_steps=int(rnd[wire.LOCAL_STEPS]),  # type: ignore[arg-type]
                              local_epochs=float(rnd.get(wire.LOCAL_EPOCHS, 0.0)),  # type: ignore[arg-type]
                              batch_size=batch_size, grad_accum=cfg.train.grad_accum,
                              max_local_steps=cfg.train.max_local_steps)
    t0 = time.perf_counter()
    stats = train_steps(
        model, data, steps=steps, batch_size=batch_size,
        lr=float(rnd[wire.LR]), seed=int(rnd[wire.SEED]),  # type: ignore[arg-type]
        modality_dropout_p=cfg.train.modality_dropout, grad_accum=cfg.train.grad_accum,
        modality_weights={m: float(getattr(cfg.importance, m)) for m in MODALITIES},
        lr_schedule=cfg.train.lr_schedule, prox_mu=cfg.train.prox_mu,
    )
    train_s = time.perf_counter() - t0
    new = {k: v.detach().cpu().float().numpy() for k, v in trainable_state(model, cfg.train.scope).items()}
    delta = {k: new[k] - global_state[k] for k in new}
    if node.state_path is not None:  # the device's latest adapters survive a restart
        node_state.save_arrays(node.state_path / node_state.ADAPTERS_FILE, new, {"base_version": version})

    counts = modality_counts(data)
    metrics: dict[str, Any] = {
        wire.NUM_EXAMPLES: float(n),
        wire.LOSS: stats["loss"],
        wire.TRAIN_SECONDS: train_s,
        wire.TRAIN_STEPS: float(steps),
        wire.PARTITION_ID: float(context.node_config.get(PARTITION_ID, -1)),  # the virtual clock's key
        **{f"{wire.COUNT_PREFIX}{m}": float(counts[m]) for m in MODALITIES},
    }
    content = RecordDict({
        RAW_DELTA: ArrayRecord({k: Array(np.ascontiguousarray(delta[k])) for k in sorted(delta)}),
        wire.UPDATE: ConfigRecord({wire.BASE_VERSION: version}),
        wire.METRICS: MetricRecord(metrics),
    })
    log.info("device %s: trained from version %d on %d samples in %.2fs, loss %.3f",
             node.name, version, n, train_s, stats["loss"])
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """QUERY: what this node is; the simulation's partition id (-1 on a real device) keys its virtual profile.

    A secure run's key and unmasking steps are QUERY messages too (:mod:`fedge.edge.secagg_mod`)."""
    if wire.SECAGG in msg.content:
        return handle_query(msg, context)
    pid = float(context.node_config.get(PARTITION_ID, -1))
    return Message(RecordDict({wire.METRICS: MetricRecord({wire.PARTITION_ID: pid})}), reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    """EVALUATE: accuracy of the received adapters on local evaluation data, overall and per modality subset."""
    node = parse_node_config(context.node_config)
    cfg = round_config(config_from_context(context.run_config), msg, node)
    model = get_model(cfg, node)
    _load_global(model, msg, cfg.train.scope)
    data = local_data(cfg, node, "eval")
    res = evaluate(model, data)
    res[wire.NUM_EXAMPLES] = res.pop("examples")
    res.update({f"{wire.COUNT_PREFIX}{m}": float(c) for m, c in modality_counts(data).items()})
    out: dict[str, Any] = dict(res)
    return Message(RecordDict({wire.METRICS: MetricRecord(out)}), reply_to=msg)
