"""Run the fedge ServerApp over Flower's simulation engine (synthetic data) for tests: a subprocess entry point.

usage: python -m tests.cloud.sim_main RUN_DIR NUM_NODES CLIENT_APP(module:attr) [key=value ...]
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    from flwr.simulation import run_simulation

    from fedge.cloud.server_app import app as server_app
    from fedge.common.config import load_config, parse_overrides

    run_dir, nodes, client = Path(argv[0]).resolve(), int(argv[1]), argv[2]
    module, attr = client.split(":")
    client_app = getattr(importlib.import_module(module), attr)
    cfg = load_config(overrides={"data.source": "synthetic", **parse_overrides(argv[3:])})
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if not cfg.data.eval_path:  # the server evaluates on a named set only: the synthetic task's held-out samples
        from fedge.common.synthetic import save_heldout

        held = save_heldout(run_dir / "heldout.npz", cfg)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=str(held)))
    os.environ["FEDGE_RUN_CONFIG"] = str(cfg.save(run_dir))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


if __name__ == "__main__":
    main(sys.argv[1:])
