"""Export the aggregated model as a plain base for ``fedge cloud publish --checkpoint`` (no training, no Ray).

Merges the aggregator's final global adapters (``<run_dir>/global_adapters.npz``, written by the ServerApp when a
run ends) into the MoE base (``--base`` safetensors, or the deterministic version-0 base) and writes the merged
weights as safetensors. ``fedge cloud train`` does the same merge and then trains; this is the step without the
training, for publishing what the federation alone produced (the guide's laptop rehearsal).

    python deploy/export_base.py --config runs/cloud/config.toml --out runs/base.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="export_base.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True,
                   help="the run's resolved config (run_dir/config.toml): model shape and run_dir")
    p.add_argument("--adapters", type=Path, default=None,
                   help="global adapters (.npz); default: <run_dir>/global_adapters.npz")
    p.add_argument("--base", type=Path, default=None, help="safetensors of the current base (default: version 0)")
    p.add_argument("--out", type=Path, required=True, help="where to write the merged base (safetensors)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Merge and write; one-line errors (exit 2 for bad input, 1 when the states do not fit the model)."""
    args = parser().parse_args(argv)
    import numpy as np
    from safetensors.torch import load_file, save_file

    from fedge.cloud.training import TrainingError, initial_base, merge_adapters
    from fedge.common.config import ConfigError, load_config
    from fedge.common.model import model_kwargs

    try:
        cfg = load_config(toml_path=args.config)
    except (ConfigError, OSError) as e:
        print(f"export_base: {e}", file=sys.stderr)
        return 2
    adapters_file = args.adapters or Path(cfg.run_dir or "runs") / "global_adapters.npz"
    for what, path in (("adapters", adapters_file), ("base", args.base)):
        if path is not None and not path.is_file():
            print(f"export_base: {what} file not found: {path}", file=sys.stderr)
            return 2
    mkw = model_kwargs(cfg)
    try:
        base = load_file(str(args.base)) if args.base is not None else initial_base(mkw)
        state = merge_adapters(base, dict(np.load(adapters_file)), mkw=mkw, rank=cfg.model.lora_rank,
                               alpha=cfg.model.lora_alpha)
    except TrainingError as e:
        print(f"export_base: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")  # a reader never sees half a file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, args.out)
    print(f"export_base: merged {adapters_file} into the base; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
