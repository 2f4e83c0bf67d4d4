"""The cloud ServerApp on Flower's Grid: ``app`` (``fedge.cloud.server_app:app`` in pyproject.toml) and its ``main``.

``main`` reads the run config, brings up the dashboard, waits for ``aggregation.min_nodes`` SuperNodes, starts
(or resumes from its checkpoint) the aggregator state on Ray, and runs the aggregation loop
(:class:`fedge.cloud.server_loop.ServerLoop`: FedBuff asynchronous buffered aggregation, or FedAvg) until
``aggregation.versions`` versions exist; on the way out it checkpoints and writes the final adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedge.common import wire
from fedge.common.config import config_from_context, default_run_dir
from fedge.common.run_log import Event
from fedge.common.scope import trainable_state

from . import clock as clk
from .builders import NO_EVAL, global_model, heldout_data, state_kwargs
from .dashboard.watch import watch
from .flower_patch import bound_reply_pulls
from .run_log import event, save_final
from .server_loop import ServerLoop
from .state import AggregatorState, ensure_ray, start_actor

__all__ = ["CHECKPOINT_SUBDIR", "app", "is_simulation", "main", "ray_dashboard_url"]

log = logging.getLogger("fedge.server")
app = ServerApp()

CHECKPOINT_SUBDIR = "checkpoints"


def is_simulation(grid: Grid) -> bool:
    """Whether the Grid is Flower's simulation engine (in-memory, Ray started in this process)."""
    return type(grid).__name__ == "InMemoryGrid"


def _wait_nodes(grid: Grid, n: int, timeout_s: float,
                on_nodes: Callable[[list[int]], None] | None = None) -> list[int]:
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if on_nodes is not None:
            on_nodes(nodes)
        if len(nodes) >= n or time.monotonic() - t0 > timeout_s:
            return nodes
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Aggregate asynchronously (or synchronously) until ``aggregation.versions`` versions exist."""
    t_start = time.monotonic()
    cfg = config_from_context(context.run_config)
    torch.manual_seed(cfg.seed)
    if not cfg.run_dir:  # every run keeps its record; `flwr run .` without run_dir gets one of its own
        cfg = dataclasses.replace(cfg, run_dir=str(default_run_dir(context.run_id)))
        print(f"[fedge] run directory: {cfg.run_dir}", flush=True)
    run_dir = Path(cfg.run_dir)
    cfg.save(run_dir)
    sim = is_simulation(grid)
    if not sim and not bound_reply_pulls(cfg.aggregation.reply_timeout_s):
        log.warning("cannot bound Flower's wait for a reply's objects: a device killed mid-upload may stall "
                    "the loop")
    virtual = cfg.aggregation.clock == "virtual" or (cfg.aggregation.clock == "auto" and sim)
    # the dashboard comes up first: an operator sees devices connect while the server waits for them
    watched = watch(cfg.dashboard, run_dir=run_dir, mode=cfg.aggregation.mode,
                    buffer_size=state_kwargs(cfg, None)["buffer_size"], concurrency=cfg.aggregation.concurrency,
                    target_versions=cfg.aggregation.versions, clock="virtual" if virtual else "real")
    nodes = _wait_nodes(grid, cfg.aggregation.min_nodes, 120.0, on_nodes=watched.live.nodes)
    if not nodes:
        watched.close()
        raise RuntimeError("no SuperNodes connected")
    how = ensure_ray(wait_for_simulation_s=120.0 if sim else 0.0, run_dir=run_dir)
    model = global_model(cfg)
    ckpt_dir = str(run_dir / CHECKPOINT_SUBDIR) if run_dir else None
    kwargs = state_kwargs(cfg, ckpt_dir)
    restored: AggregatorState | None = None
    if ckpt_dir and cfg.aggregation.resume and (Path(ckpt_dir) / "aggregator.npz").is_file():
        restored = AggregatorState.restore(**kwargs)  # the config's aggregation options win over the saved
    if restored is not None:
        actor = start_actor(restored)
    else:
        initial = {k: v.numpy() for k, v in trainable_state(model, cfg.train.scope).items()}
        actor = start_actor(None, initial=initial, **kwargs)
    import ray

    version, _ = ray.get(actor.snapshot.remote())
    history = ray.get(actor.get_history.remote())
    t0 = float(history[-1]["time"]) if history and math.isfinite(history[-1]["time"]) else 0.0
    clock: clk.RealClock | clk.VirtualClock = clk.VirtualClock(t0) if virtual else clk.RealClock(t0)
    if restored is not None:
        recovery_s = time.monotonic() - t_start
        print(f"[fedge] resumed from checkpoint: version {version} (ray: {how}) in {recovery_s:.2f} s",
              flush=True)
        event(run_dir, event=Event.RESUMED, version=version, recovery_s=recovery_s, ray=how)
    else:
        event(run_dir, event=Event.STARTED, version=version, ray=how, mode=cfg.aggregation.mode,
              clock="virtual" if virtual else "real")
    num_partitions = max(len(nodes), 1)  # simulation: Flower's num-partitions = the number of nodes
    watched.live.started(version)
    if ray_dashboard_url():
        print(f"[fedge] Ray dashboard: {ray_dashboard_url()}", flush=True)
        watched.live.link("ray", ray_dashboard_url())
    eval_data = heldout_data(cfg)
    if eval_data is None:
        print(f"[fedge] {NO_EVAL}", flush=True)
        event(run_dir, event=Event.NO_EVAL_SET)
    loop = ServerLoop(grid, cfg, actor=actor, clock=clock, run_dir=run_dir, eval_data=eval_data,
                      model=model, num_partitions=num_partitions, live=watched.live)
    loop.t_wall0 = t_start
    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        loop.run()
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
        watched.close()
        path = ray.get(actor.checkpoint.remote())
        st = ray.get(actor.stats.remote())
        version, params = ray.get(actor.snapshot.remote())
        event(run_dir, event=Event.STOPPED, checkpoint=path, **st)
        log.info("aggregator stopped at version %d (%s)", version, st)
        if run_dir:
            save_final(run_dir, params, {**st, "dispatches": loop.dispatches})
        context.state["fedge-final"] = wire.adapters_to_record(params)
        ray.kill(actor)


def ray_dashboard_url() -> str:
    """The URL of Ray's dashboard when the Ray this process joined runs one ("" otherwise)."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # no public getter once Ray is started elsewhere
    except Exception:  # noqa: BLE001  (not connected, or a Ray without it: no link, no failure)
        return ""
    return f"http://{url}" if url and not url.startswith("http") else (url or "")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
