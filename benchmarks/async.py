"""Virtual time to a target accuracy: asynchronous FedBuff vs synchronous FedAvg, same data, same devices.

Both runs use the very ServerApp and ClientApp on Flower's simulation engine (one subprocess each, its own
Ray), the same synthetic partitions and the same device profiles (``[profiles]``: a fraction of devices
``slowdown``-times slower). The virtual clock (cloud/clock.py) decides when each reply arrives. FedBuff keeps
``C`` devices busy and makes a version from every ``K`` updates; FedAvg sends a round to ``C`` devices and waits
for all of them. Each run stops at the target accuracy (``aggregation.stop_at_accuracy``).

    .venv/bin/python benchmarks/async.py [--devices 10] [--target 0.8]

Last line: ``speedup_vs_sync=… target_accuracy=…`` (sync virtual time / async virtual time to the target).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

if TYPE_CHECKING:
    from fedge.common.run_log import VersionRecord

ROOT = Path(__file__).resolve().parents[1]


def _child(run_dir: str, nodes: int, overrides: list[str]) -> None:
    """One simulation (runs in a subprocess: ``run_simulation`` owns and shuts down its Ray)."""
    import dataclasses

    from flwr.simulation import run_simulation

    from fedge.cloud.server_app import app as server_app
    from fedge.common.config import load_config, parse_overrides
    from fedge.common.synthetic import save_heldout
    from fedge.edge.client_app import app as client_app

    cfg = load_config(overrides=parse_overrides(overrides))
    cfg = dataclasses.replace(cfg, run_dir=str(Path(run_dir).resolve()))
    held = save_heldout(Path(cfg.run_dir) / "heldout.npz", cfg)  # the server scores a named set only
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=str(held)))
    os.environ["FEDGE_RUN_CONFIG"] = str(cfg.save(cfg.run_dir))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


def _run(mode: str, run_dir: Path, args: argparse.Namespace) -> list[VersionRecord]:
    common = [
        "data.source=\"synthetic\"", f"data.samples_per_device={args.samples}", "data.eval_samples=400",
        f"seed={args.seed}", f"train.local_steps={args.local_steps}", "communication.topk_ratio=0.1",
        f"profiles.straggler_fraction={args.straggler_fraction}",
        f"profiles.straggler_slowdown_min={args.slowdown[0]}", f"profiles.straggler_slowdown_max={args.slowdown[1]}",
        f"aggregation.stop_at_accuracy={args.target}", f"aggregation.concurrency={args.devices}",
        f"aggregation.mode=\"{mode}\"", "fault_tolerance.checkpoint_every=1000",
    ]
    if mode == "async":
        common += [f"aggregation.buffer_size={args.k}", f"aggregation.versions={args.max_versions * 4}",
                   f"aggregation.max_staleness={args.max_staleness}"]
    else:
        common += [f"aggregation.versions={args.max_versions}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(args.devices), *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    from fedge.common.run_log import read_versions

    recs = read_versions(run_dir)
    print(f"{mode:5s}: {len(recs)} versions, final accuracy {recs[-1].accuracy:.3f} at virtual "
          f"{recs[-1].virtual_time:.1f}s ({time.perf_counter() - t0:.0f}s wall)", flush=True)
    return recs


def _time_to(recs: list[VersionRecord], target: float) -> float | None:
    for r in recs:
        if r.accuracy >= target:
            return float(r.virtual_time)
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10, help="virtual devices (= C for both modes)")
    p.add_argument("--k", type=int, default=3, help="FedBuff buffer size K")
    p.add_argument("--target", type=float, default=0.8, help="target accuracy on held-back data")
    p.add_argument("--straggler-fraction", type=float, default=0.2)
    p.add_argument("--slowdown", type=float, nargs=2, default=(5.0, 10.0), help="straggler slowdown range")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=150, help="samples per device")
    p.add_argument("--max-versions", type=int, default=12, help="sync rounds at most (async: 4x versions)")
    p.add_argument("--max-staleness", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    args = parse_quick(p, devices=4, samples=40, max_versions=3, local_steps=2, target=0.3, timeout=240)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-async-") as tmp:
        res = {m: _run(m, Path(tmp) / m, args) for m in ("sync", "async")}
    t = {m: _time_to(recs, args.target) for m, recs in res.items()}
    for m in ("sync", "async"):
        msg = f"{t[m]:.1f}s" if t[m] is not None else "not reached"
        print(f"{m:5s}: virtual time to accuracy {args.target}: {msg}")
    if t["sync"] is None or t["async"] is None:
        raise SystemExit("target accuracy not reached by both runs: raise --max-versions or lower --target")
    print(f"speedup_vs_sync={t['sync'] / t['async']:.2f} target_accuracy={args.target}")


if __name__ == "__main__":
    main()
