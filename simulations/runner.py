"""Run the fedge ServerApp and ClientApp on Flower's simulation engine over an embedded Ray.

The very apps a deployment runs (STYLE.md rule 6): :func:`run` prepares the scenario's data (rendered streams
through the edge ingest into per-device stores, :mod:`fedge.simulations.prepare`), writes the resolved config into the
run directory, runs ``flwr.simulation.run_simulation`` with a progress bar that follows ``metrics.jsonl``, and
writes the report (:mod:`fedge.simulations.report`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from fedge.common.config import FedgeConfig
from fedge.common.run_log import EVENT_LOG, VERSION_LOG, read_versions

__all__ = ["default_cache", "run"]


def default_cache() -> Path:
    """Where prepared data is cached: ``$FEDGE_SIM_CACHE`` or ``runs/.data``."""
    return Path(os.environ.get("FEDGE_SIM_CACHE", "runs/.data"))


def _follow(path: Path, total: int, stop: threading.Event, desc: str) -> None:
    """Progress bar over global versions, fed by the server's metrics.jsonl as it grows."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="version")
    seen = 0
    while True:
        done = stop.wait(0.5)
        recs = read_versions(path)  # a line the server is still writing is skipped until it is whole
        if len(recs) > seen:
            last = recs[-1]
            post = {"acc": "-" if last.accuracy is None else f"{last.accuracy:.3f}"}
            if last.virtual_time is not None:
                post["vtime"] = f"{last.virtual_time:.0f}s"
            bar.set_postfix(post)
            bar.update(len(recs) - seen)
            seen = len(recs)
        if done:
            break
    bar.close()


def run(cfg: FedgeConfig, *, out_dir: str | Path, num_nodes: int | None = None, cache: str | Path | None = None,
        progress: bool = True, report: bool = True, apps: tuple[Any, Any] | None = None,
        ray_dashboard: bool = False, ray_address: str = "") -> Path:
    """Run one federated simulation; return the run directory.

    The run directory holds ``config.toml``/``config.json`` (resolved), ``prepared.json`` (what the ingest
    produced), ``metrics.jsonl`` (one record per global version, written by the ServerApp), ``wall_seconds.txt``
    and, with ``report``, the report (``report.md``, PNG plots, TensorBoard events).

    The resolved config travels to the apps through ``$FEDGE_RUN_CONFIG`` (``run_simulation`` carries no run
    config); Ray workers inherit the variable because it is set before Ray starts. ``apps`` replaces fedge's
    (ServerApp, ClientApp) pair, for a peer run on the very same data (benchmarks). ``ray_dashboard`` starts
    Ray's own dashboard on 127.0.0.1 (the ServerApp prints its URL); the fedge dashboard is ``cfg.dashboard``.
    ``ray_address`` (``HOST:PORT`` or ``auto``) runs everything on that existing Ray cluster instead
    (:mod:`fedge.simulations.cluster`; its nodes go to ``cluster.json``); ``simulation.num_cpus`` is then the cluster's.
    """
    from flwr.simulation import run_simulation

    from .engine import install

    install()  # Flower's engine delivers messages in one scan per pass: 10,000 nodes stay fast

    if apps is None:
        from fedge.cloud.server_app import app as server_app
        from fedge.edge.client_app import app as client_app
    else:
        server_app, client_app = apps

    from .given_data import resolve_data

    run_dir = Path(out_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # a simulation starts afresh: an earlier run's outputs in the same directory would mix in (and its aggregator
    # checkpoint would make the server resume instead of start)
    for name in (VERSION_LOG, EVENT_LOG, "summary.json", "global_adapters.npz"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if num_nodes is not None:
        cfg = dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, devices=num_nodes))
    if cfg.aggregation.min_nodes < cfg.simulation.devices:  # Flower registers nodes while the ServerApp starts:
        # at 10,000 the server would otherwise count the devices (and so their profiles) from the first few
        cfg = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation,
                                                                       min_nodes=cfg.simulation.devices))
    if cfg.model.base_path:  # a named base must exist before any data is prepared
        from fedge.common.base_weights import read_base

        read_base(cfg.model.base_path)
    if ray_address:  # joined before the data is prepared: pretraining and the simulation both run there
        from . import cluster

        os.environ["FEDGE_RUN_CONFIG"] = str(run_dir / "config.toml")  # where cfg.save writes it below
        info = cluster.connect(ray_address)
        cluster.write(run_dir, info)
        print(cluster.describe(info), flush=True)
    cache_root = Path(cache) if cache is not None else default_cache()
    cfg, summary = resolve_data(cfg, cache_root, progress=progress)
    if cfg.model.base_path:  # every party loads it: a file that does not fit fails here, in one line
        from .evaluation import model_with

        model_with(cfg, None)
    (run_dir / "prepared.json").write_text(json.dumps(summary, indent=1))
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    path = cfg.save(run_dir)
    os.environ["FEDGE_RUN_CONFIG"] = str(path)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sim = cfg.simulation
    cpus = sim.num_cpus or max(1, min(os.cpu_count() or 1, 4))
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(run_dir / VERSION_LOG, cfg.aggregation.versions, stop,
                                                      f"{cfg.aggregation.mode} federated training"), daemon=True)
    if progress:
        follower.start()
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=sim.devices,
            backend_config={
                "client_resources": {"num_cpus": sim.client_cpus},
                "init_args": {"num_cpus": cpus, "include_dashboard": ray_dashboard, "log_to_driver": True,
                              **({"dashboard_host": "127.0.0.1"} if ray_dashboard else {})},
            },
        )
    finally:
        stop.set()
        if progress:
            follower.join()
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.2f}\n")
    if report:
        from .report import write_report

        write_report(run_dir)
    return run_dir
