"""The cloud ServerApp on Flower's Grid: synchronous FedAvg over codec-encoded adapter deltas.

Each version: send TRAIN (global adapters + round config) to the sampled nodes, wait for their replies,
decode and validate each delta, average them weighted by examples, apply with the server learning rate,
evaluate the new global adapters on held-back data and log accuracy per version.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from common import codec, wire
from common.config import FedgeConfig, config_from_context
from common.lora import adapter_state, apply_lora, load_adapter_state
from common.model import MultimodalMoE, build_model, model_kwargs
from common.synthetic import make_av_dataset
from common.training import evaluate

log = logging.getLogger("fedge.server")
app = ServerApp()


def global_model(cfg: FedgeConfig) -> MultimodalMoE:
    """The global model: the deterministic base with LoRA applied (same construction as on devices)."""
    m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    return apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)  # type: ignore[return-value]


def heldout_data(cfg: FedgeConfig) -> dict[str, np.ndarray]:
    """Held-back evaluation data (a seed no device uses)."""
    m = cfg.model
    return make_av_dataset(cfg.data.eval_samples, seed=cfg.seed * 100_003 + 99_991, num_classes=m.num_classes,
                           image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)


def _wait_nodes(grid: Grid, n: int, timeout_s: float) -> list[int]:
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() - t0 > timeout_s:
            return nodes
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run synchronous FedAvg for ``aggregation.versions`` versions and log accuracy per version."""
    cfg = config_from_context(context.run_config)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir:
        cfg.save(run_dir)
    model = global_model(cfg)
    state = {k: v.numpy() for k, v in adapter_state(model).items()}
    eval_data = heldout_data(cfg)
    agg = cfg.aggregation
    nodes = _wait_nodes(grid, agg.min_nodes, 60.0)
    if not nodes:
        raise RuntimeError("no SuperNodes connected")
    rng = np.random.default_rng(cfg.seed)
    history = []
    for version in range(agg.versions):
        chosen = sorted(nodes[i] for i in rng.permutation(len(nodes))[: min(agg.concurrency, len(nodes))])
        rnd = wire.round_record(version=version, lr=cfg.train.lr, local_steps=cfg.train.local_steps,
                                batch_size=cfg.train.batch_size, seed=cfg.seed * 7919 + version)
        msgs = [Message(wire.train_message_content(state, rnd), dst_node_id=int(n),
                        message_type=MessageType.TRAIN) for n in chosen]
        replies = list(grid.send_and_receive(msgs, timeout=agg.reply_timeout_s))
        deltas, weights, up = [], [], 0.0
        for r in replies:
            if r.has_error():
                log.warning("node reply error: %s", r.error)
                continue
            try:
                d = codec.decode(r.content[wire.UPDATE][wire.DELTA])
            except codec.CodecError as e:
                log.warning("rejected update: %s", e)
                continue
            if set(d) != set(state) or any(d[k].shape != state[k].shape for k in d):
                log.warning("rejected update: adapter keys/shapes differ")
                continue
            m = r.content[wire.METRICS]
            deltas.append(d)
            weights.append(float(m[wire.NUM_EXAMPLES]))
            up += float(m[wire.UPLOAD_BYTES])
        if deltas:
            w = np.asarray(weights) / np.sum(weights)
            state = {k: state[k] + agg.server_lr * sum(wi * d[k] for wi, d in zip(w, deltas)) for k in state}
        load_adapter_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
        res = evaluate(model, eval_data)
        rec = {"version": version + 1, "accuracy": res["accuracy"], "loss": res["loss"],
               "updates": len(deltas), "upload_bytes": up}
        history.append(rec)
        print(f"[fedge] version {version + 1:3d}  accuracy {res['accuracy']:.3f}  loss {res['loss']:.3f}  "
              f"updates {len(deltas)}  uploaded {up / 1024:.1f} KiB", flush=True)
        if run_dir:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    context.state["fedge-final"] = wire.adapters_to_record(state)
