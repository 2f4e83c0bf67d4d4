"""The peer for benchmarks: plain Flower FedAvg (``flwr.serverapp.strategy.FedAvg``) on the same model and data.

Same base model with LoRA, the same trainable scope (``train.scope``, :mod:`fedge.common.scope`), same local training
(:func:`fedge.common.training.train_steps`), same per-device data (:func:`fedge.edge.data.local_data`, i.e. the same stores),
same held-out set; but Flower's own strategy: the full float32 trainable state both ways, no codec, no validation, no staleness, no virtual clock. Run through
``flwr.simulation.run_simulation`` exactly like fedge's apps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedge.cloud.builders import heldout_data
from fedge.common.config import config_from_context
from fedge.common.run_log import VersionRecord, append_version
from fedge.common.scope import load_trainable_state, set_trainable, trainable_state
from fedge.common.training import evaluate, train_steps

from .evaluation import ADAPTERS, model_with

__all__ = ["client_app", "server_app"]

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Load the global adapters, train locally, send the adapters back (float32, uncompressed)."""
    from fedge.edge.data import local_data
    from fedge.edge.node_config import parse_node_config

    cfg = config_from_context(context.run_config)
    torch.set_num_threads(1)
    model = set_trainable(model_with(cfg, None), cfg.train.scope)
    load_trainable_state(model, dict(msg.content["arrays"].to_torch_state_dict()), cfg.train.scope)
    data = local_data(cfg, parse_node_config(context.node_config), "train")
    rnd = int(msg.content["config"]["server-round"])
    stats = train_steps(model, data, steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
                        lr=cfg.train.lr, seed=cfg.seed * 7919 + rnd,
                        modality_dropout_p=cfg.train.modality_dropout)
    content = RecordDict({
        "arrays": ArrayRecord(trainable_state(model, cfg.train.scope)),
        "metrics": MetricRecord({"num-examples": float(len(data["label"])), "loss": stats["loss"]}),
    })
    return Message(content, reply_to=msg)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    """FedAvg for ``aggregation.versions`` rounds over ``aggregation.concurrency`` nodes; log accuracy per round."""
    cfg = config_from_context(context.run_config)
    torch.manual_seed(cfg.seed)
    model = model_with(cfg, None)
    eval_data = heldout_data(cfg)  # a store or an NPZ, labels checked against the model
    if eval_data is None:
        raise ValueError("the Flower baseline scores every round: it needs data.eval_path")
    n = cfg.simulation.devices
    frac = min(1.0, cfg.aggregation.concurrency / n)
    k = max(1, int(frac * n))
    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_trainable_state(model, dict(arrays.to_torch_state_dict()), cfg.train.scope)
        res = evaluate(model, eval_data)
        if server_round > 0:
            append_version(run_dir, VersionRecord(version=server_round, accuracy=res["accuracy"], loss=res["loss"],
                                                  updates=k, wall_time=time.perf_counter() - t0))
        return MetricRecord({"accuracy": res["accuracy"]})

    strategy = FedAvg(fraction_train=frac, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=n)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_state(model, cfg.train.scope)),
                            num_rounds=cfg.aggregation.versions, timeout=cfg.aggregation.reply_timeout_s,
                            train_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
    # the final global state, where fedge's server leaves its own: per-modality evaluation reads either the same way
    final = {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()}
    np.savez(run_dir / ADAPTERS, **final)
