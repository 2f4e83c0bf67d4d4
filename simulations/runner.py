"""Run the fedge ServerApp and ClientApp on Flower's simulation engine over an embedded Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common.config import FedgeConfig


def run(cfg: FedgeConfig, *, num_nodes: int, out_dir: str | Path, num_cpus: int | None = None,
        client_cpus: float = 1.0) -> Path:
    """Run one federated simulation; return the run directory (resolved config, metrics.jsonl).

    The resolved config travels to the apps through ``$FEDGE_RUN_CONFIG`` (``run_simulation`` carries no run
    config); Ray workers inherit the variable because it is set before Ray starts.
    """
    from flwr.simulation import run_simulation

    from cloud.server_app import app as server_app
    from edge.client_app import app as client_app

    run_dir = Path(out_dir).resolve()
    cfg = FedgeConfig(**{**cfg.__dict__, "run_dir": str(run_dir)})
    path = cfg.save(run_dir)
    os.environ["FEDGE_RUN_CONFIG"] = str(path)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = num_cpus or max(1, min(os.cpu_count() or 1, 4))
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_config={
            "client_resources": {"num_cpus": client_cpus},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
        },
    )
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.2f}\n")
    return run_dir
