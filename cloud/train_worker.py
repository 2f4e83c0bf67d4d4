"""The Ray Train worker of a global training: restore or start, DDP-train the whole model for ``steps`` optimizer
steps on this worker's data shard, report metrics and checkpoint (:class:`fedge.cloud.training.GlobalTrainer`
runs it).

Each micro-batch is a pure function of (seed, rank, step, micro), so a run resumed from a checkpoint after a
worker failure replays the very batches it would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedge.common.augment import augment_batch
from fedge.common.model import MultimodalMoE, build_model, fusion_loss
from fedge.common.training import forward_batch, modality_dropout, to_batch

from .adapters import TrainingError
from .metrics import modality_eval, routing_stats

__all__ = ["CKPT_FILE", "COLUMNS", "train_loop_per_worker"]

COLUMNS = ("image", "audio", "label", "mask", "quality")  # the trainer's dataset columns
CKPT_FILE = "state.pt"  # in each Ray Train checkpoint: model, optimizer state, step


def _shard_arrays(shard: Any) -> dict[str, np.ndarray]:
    """Pull this worker's Ray Data shard into memory (small curated sets; steps sample from it)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in COLUMNS}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for k in COLUMNS:
            parts[k].append(np.asarray(batch[k]))
    if not parts["label"]:
        raise TrainingError("this worker's data shard is empty")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["image"] = out["image"].astype(np.float32)
    out["audio"] = out["audio"].astype(np.float32)
    out["label"] = out["label"].astype(np.int64)
    out["mask"] = out["mask"].astype(bool)
    out["quality"] = out["quality"].astype(np.float32)
    return out


def _step_batch(data: Mapping[str, np.ndarray], *, seed: int, rank: int, step: int, micro: int,
                batch_size: int, dropout: float, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """The micro-batch of a step: a pure function of (seed, rank, step, micro), so a resumed run replays it."""
    rng = np.random.default_rng([seed, rank, step, micro])
    n = len(data["label"])
    b = to_batch(data, rng.integers(0, n, size=min(batch_size, n)))
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    mask = modality_dropout(b["mask"], dropout, gen)
    b = augment_batch(b, gen)
    return {k: v.to(device) for k, v in b.items()}, mask.to(device)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: restore or start, DDP-train for ``steps`` optimizer steps, report + checkpoint."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t_start = time.time()
    run_dir = Path(config["run_dir"])
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    (run_dir / "workers" / f"rank-{rank}.json").write_text(json.dumps({"pid": os.getpid(), "rank": rank,
                                                                        "started": t_start}))
    torch.manual_seed(config["seed"])
    model = build_model(**config["model_kwargs"])
    model.load_state_dict(config["base_state"])
    start_step, restored_from, opt_state = 0, -1, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt_state, start_step = st["optim"], int(st["step"])
        restored_from = start_step
    device = ray.train.torch.get_device()
    # Experts a batch does not route to (and encoders of absent modalities) get no gradient: tell DDP.
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    raw: MultimodalMoE = ddp.module if hasattr(ddp, "module") else ddp  # type: ignore[assignment]
    opt = torch.optim.Adam(ddp.parameters(), lr=config["lr"])
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    data = _shard_arrays(ray.train.get_dataset_shard("train"))
    eval_b = {k: v.to(device) for k, v in to_batch(data, slice(0, config["eval_rows"])).items()}

    steps, accum, every = config["steps"], config["grad_accum"], config["checkpoint_every"]
    log_every, e = config["log_every"], raw.num_experts
    win_loss, win_aux, win_n, win_m, win_t0 = 0.0, 0.0, 0, 0, time.perf_counter()
    stats: dict[str, list[float]] = {}
    first_step_time = 0.0
    ddp.train()
    for step in range(start_step, steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(accum):
            b, mask = _step_batch(data, seed=config["seed"], rank=rank, step=step, micro=micro,
                                  batch_size=config["batch_size"], dropout=config["modality_dropout"],
                                  device=device)
            sync = contextlib.nullcontext() if micro == accum - 1 or world == 1 else ddp.no_sync()  # type: ignore[operator]
            with sync:
                out = forward_batch(ddp, b, mask)  # type: ignore[arg-type]
                ce = fusion_loss(out, b["label"], mask, b.get("reliable")).mean()
                loss = ce + config["aux_weight"] * out.aux_loss
                (loss / accum).backward()
            win_loss += float(ce.detach()) * len(b["label"])
            win_aux += float(out.aux_loss.detach())
            win_n += len(b["label"])
            win_m += 1
            for k, v in routing_stats(out, mask, e).items():
                stats.setdefault(k, []).append(v)
        opt.step()
        done = step + 1
        if done == start_step + 1:
            first_step_time = time.time()
        is_ckpt = done % every == 0 or done == steps
        if not (is_ckpt or done % log_every == 0):
            continue
        elapsed = max(time.perf_counter() - win_t0, 1e-9)
        rec: dict[str, Any] = {
            "step": done, "time": time.time(), "rank": rank,
            "loss/train": win_loss / max(win_n, 1),
            "aux_loss": win_aux / max(win_m, 1),
            "samples_per_s": win_n * world / elapsed,
            "restored_from": restored_from, "first_step_time": first_step_time, "worker_start": t_start,
            "dropped_tokens": float(out.dropped_tokens),
            "checkpoint": bool(is_ckpt),
        }
        rec.update({k: float(np.mean(v)) for k, v in stats.items()})
        rec.update(modality_eval(raw, eval_b))
        if is_ckpt and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": raw.state_dict(), "optim": opt.state_dict(), "step": done},
                           Path(d) / CKPT_FILE)
                ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"step-{done:06d}")
        else:
            ray.train.report(rec)
        # the throughput window counts optimizer steps only, not evaluation, checkpointing or reporting
        win_loss, win_aux, win_n, win_m, win_t0, stats = 0.0, 0.0, 0, 0, time.perf_counter(), {}
