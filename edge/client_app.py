"""The edge ClientApp (Flower Message API): trains LoRA adapters locally and replies with a compressed delta."""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import codec, wire
from common.config import FedgeConfig, config_from_context
from common.lora import adapter_state, apply_lora, load_adapter_state
from common.model import MultimodalMoE, build_model, model_kwargs
from common.training import evaluate, train_steps

from .data import PARTITION_ID, local_data

RESIDUAL = "ef-residual"  # error-feedback residual kept in the node's Context.state across rounds

app = ClientApp()
_MODELS: dict[str, MultimodalMoE] = {}


def get_model(cfg: FedgeConfig) -> MultimodalMoE:
    """The base model with LoRA applied, built once per process (deterministic from the config seed)."""
    key = repr((model_kwargs(cfg), cfg.model.lora_rank, cfg.model.lora_alpha))
    if key not in _MODELS:
        torch.set_num_threads(1)
        m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
        apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
        _MODELS[key] = m
    return _MODELS[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """TRAIN: load the global adapters, train locally, reply with the codec-encoded delta and metrics."""
    cfg = config_from_context(context.run_config)
    rnd = msg.content[wire.ROUND]
    version = int(rnd[wire.VERSION])
    global_state = wire.record_to_adapters(msg.content[wire.ARRAYS])
    model = get_model(cfg)
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in global_state.items()})
    data = local_data(cfg, context.node_config)

    t0 = time.perf_counter()
    stats = train_steps(
        model, data, steps=int(rnd[wire.LOCAL_STEPS]), batch_size=int(rnd[wire.BATCH_SIZE]),
        lr=float(rnd[wire.LR]), seed=int(rnd[wire.SEED]), modality_dropout_p=cfg.train.modality_dropout,
        grad_accum=cfg.train.grad_accum,
    )
    train_s = time.perf_counter() - t0
    new = {k: v.numpy() for k, v in adapter_state(model).items()}
    delta = {k: new[k] - global_state[k] for k in new}

    comm = cfg.communication
    params = codec.CodecParams(
        topk_ratio=comm.topk_ratio if comm.compression == "topk" else 1.0,
        bits=comm.quant_bits, error_feedback=comm.error_feedback,
    )
    residual = None
    if RESIDUAL in context.state:
        residual = {k: np.asarray(v.numpy()) for k, v in context.state[RESIDUAL].items()}
        if set(residual) != set(delta) or any(residual[k].shape != delta[k].shape for k in delta):
            residual = None  # the model changed shape: start feedback afresh
    payload, residual = codec.encode(delta, params, residual)
    if comm.error_feedback:
        context.state[RESIDUAL] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in residual.items()})

    mask = np.asarray(data["mask"], dtype=bool)
    metrics = {
        wire.NUM_EXAMPLES: float(len(data["label"])),
        wire.LOSS: stats["loss"],
        wire.TRAIN_SECONDS: train_s,
        wire.UPLOAD_BYTES: float(len(payload)),
        wire.RAW_BYTES: float(codec.raw_nbytes(delta)),
        wire.PARTITION_ID: float(context.node_config.get(PARTITION_ID, -1)),
        f"{wire.COUNT_PREFIX}image": float(mask[:, 0].sum()),
        f"{wire.COUNT_PREFIX}audio": float(mask[:, 1].sum()),
    }
    return Message(wire.update_content(base_version=version, payload=payload, metrics=metrics), reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    """EVALUATE: accuracy of the global adapters on this node's data, overall and per modality subset."""
    cfg = config_from_context(context.run_config)
    model = get_model(cfg)
    state = wire.record_to_adapters(msg.content[wire.ARRAYS])
    load_adapter_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
    res = evaluate(model, local_data(cfg, context.node_config))
    res[wire.NUM_EXAMPLES] = res.pop("examples")
    return Message(RecordDict({wire.METRICS: MetricRecord(res)}), reply_to=msg)
