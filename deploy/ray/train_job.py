"""Entry point of the KubeRay RayJob ``fedge-train`` (and of ``ray job submit``): one on-demand global training run.

Joins the Ray cluster the job runs on, merges the aggregator's newest global adapters (``<run_dir>/
global_adapters.npz``, when the aggregator has written them) into the MoE base (``--base`` safetensors, or the
deterministic version-0 base), trains with Ray Train as ``[training]`` in the run config says, and writes the new
base as a safetensors file that ``fedge cloud publish --checkpoint`` exports as shards for the ShardServer.

    python deploy/ray/train_job.py --config /etc/fedge/fedge.toml --out /data/runs/fedge/train/base-latest.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """Command-line arguments (the RayJob's entrypoint uses them)."""
    p = argparse.ArgumentParser(prog="train_job.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=os.environ.get("FEDGE_RUN_CONFIG") or None,
                   help="run config TOML (default: $FEDGE_RUN_CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. training.steps=50)")
    p.add_argument("--base", type=Path, default=None, help="safetensors of the current base (default: version 0)")
    p.add_argument("--base-version", type=int, default=0, help="aggregated version the adapters belong to")
    p.add_argument("--out", type=Path, required=True, help="where to write the trained base (safetensors)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                   help="Ray cluster to join (default: $RAY_ADDRESS or auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import numpy as np
    import ray
    from safetensors.torch import load_file, save_file

    from cloud.training import TrainingError, run_global_training
    from common.config import ConfigError, load_config, parse_overrides

    try:
        cfg = load_config(toml_path=args.config, overrides=parse_overrides(args.overrides))
    except (ConfigError, OSError) as e:
        print(f"train_job: {e}", file=sys.stderr)
        return 2
    if args.base is not None and not args.base.is_file():
        print(f"train_job: base checkpoint not found: {args.base}", file=sys.stderr)
        return 2
    base = load_file(str(args.base)) if args.base is not None else None
    adapters_file = Path(cfg.run_dir or "runs") / "global_adapters.npz"
    adapters = dict(np.load(adapters_file)) if adapters_file.is_file() else None
    ray.init(address=args.address, log_to_driver=False)
    try:
        res = run_global_training(cfg, base, adapters, base_version=args.base_version)
    except TrainingError as e:
        print(f"train_job: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in res.base_state.items()}, str(tmp))
    os.replace(tmp, args.out)
    print(f"train_job: {res.steps} steps in {res.seconds:.1f}s, loss {res.first_loss():.4f} -> "
          f"{res.last_loss():.4f}; base written to {args.out} (merged adapters: {adapters is not None})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
