"""Server optimizers, trainable scopes and local work on one asynchronous federation, over several seeds.

Each variant runs the aggregator's real state (:class:`fedge.cloud.state.AggregatorState`: validation, staleness
weighting, FedBuff buffer, server optimizer) on updates the device training code really produces
(:func:`fedge.common.training.train_steps` on each device's ingested store, the run's ``train.scope``, the codec with
error feedback per device), on the scenario's prepared data and cloud-pretrained base. What is emulated is only
the transport: an event queue in virtual time, each device's reply arriving ``steps * step_s`` after its
dispatch (device profiles of :mod:`fedge.cloud.clock`), ``C`` devices busy at once, as the ServerApp's loop keeps
them. The ServerApp itself runs in ``fedge simulate``; this is for choosing defaults quickly across seeds.

Variants are ``name:key=value,key=value`` over the scenario's config (keys of ``aggregation.*`` and ``train.*``);
the peer is the first variant. Each variant runs every seed (the seed moves the device order, dispatch
randomness and local batches; the data and base stay the scenario's), then the held-out fused accuracy of the
final version is averaged.

Last line: ``<variant>=<mean accuracy> ... best=<variant> best_vs_peer=<mean accuracy ratio>``.

Run: .venv/bin/python benchmarks/server_opt.py [--scenario S.toml] [--seeds 0,1,2] [--versions N]
     [--variant NAME:key=v,...]...
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.cloud import clock as clk  # noqa: E402
from fedge.cloud.aggregation import default_server_lr  # noqa: E402
from fedge.cloud.state import AggregatorState  # noqa: E402
from fedge.cloud.validation import RawUpdate  # noqa: E402
from fedge.common import codec, wire  # noqa: E402
from fedge.common.config import FedgeConfig, load_config, parse_overrides  # noqa: E402
from fedge.common.evaluation import model_with  # noqa: E402
from fedge.common.scope import load_trainable_state, set_trainable, trainable_state  # noqa: E402
from fedge.common.training import evaluate, local_step_budget, train_steps  # noqa: E402

DEFAULT_VARIANTS = (  # each optimizer at its default server_lr (aggregation.server_lr = 0)
    "sgd:aggregation.server_opt=sgd",
    "avgm:aggregation.server_opt=avgm",
    "adam:aggregation.server_opt=adam",
    "yogi:aggregation.server_opt=yogi",
)


def variant(cfg: FedgeConfig, spec: str) -> tuple[str, FedgeConfig]:
    """``name:key=value,...`` -> (name, cfg with those keys set)."""
    name, _, body = spec.partition(":")
    over = parse_overrides([kv for kv in body.split(",") if kv]) if body else {}
    flat = {**cfg.to_flat(), **over}
    return name, load_config(run_config=flat)


def run_federation(cfg: FedgeConfig, devices: list[dict[str, np.ndarray]], heldout: dict[str, np.ndarray], *,
                   seed: int) -> dict[str, Any]:
    """One emulated asynchronous run of ``cfg`` (see the module docstring); returns the final accuracies."""
    a, t, p = cfg.aggregation, cfg.train, cfg.profiles
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = set_trainable(model_with(cfg, None), t.scope)
    initial = {k: v.numpy() for k, v in trainable_state(model, t.scope).items()}
    state = AggregatorState(initial, buffer_size=a.buffer_size, staleness=a.staleness, max_staleness=a.max_staleness,
                            server_opt=a.server_opt, server_lr=a.server_lr or default_server_lr(a.server_opt, a.beta1), beta1=a.beta1, beta2=a.beta2, tau=a.tau,
                            max_norm=a.max_norm, norm_action=a.norm_action)
    comm = cfg.communication
    params = codec.CodecParams(topk_ratio=comm.topk_ratio if comm.compression == "topk" else 1.0,
                               bits=comm.quant_bits, error_feedback=comm.error_feedback)
    n_dev = len(devices)
    profiles = [clk.device_profile(i, n_dev, seed=seed, base_step_s=p.base_step_s, speed_sigma=p.speed_sigma,
                                   straggler_fraction=p.straggler_fraction,
                                   straggler_slowdown_min=p.straggler_slowdown_min,
                                   straggler_slowdown_max=p.straggler_slowdown_max) for i in range(n_dev)]
    residuals: list[dict[str, np.ndarray] | None] = [None] * n_dev
    queue: list[tuple[float, int, int, RawUpdate]] = []
    busy: set[int] = set()
    dispatches = 0

    def dispatch(dev: int, now: float) -> None:
        nonlocal dispatches
        version, glob = state.snapshot()
        load_trainable_state(model, {k: torch.from_numpy(v) for k, v in glob.items()}, t.scope)
        data = devices[dev]
        n = len(data["label"])
        steps = local_step_budget(n, local_steps=t.local_steps, local_epochs=t.local_epochs, batch_size=t.batch_size,
                                  grad_accum=t.grad_accum, max_local_steps=t.max_local_steps)
        train_steps(model, data, steps=steps, batch_size=t.batch_size, lr=t.lr, seed=seed * 7919 + dispatches,
                    modality_dropout_p=t.modality_dropout, grad_accum=t.grad_accum, lr_schedule=t.lr_schedule,
                    prox_mu=t.prox_mu)
        new = {k: v.numpy() for k, v in trainable_state(model, t.scope).items()}
        delta = {k: new[k] - glob[k] for k in new}
        payload, res = codec.encode(delta, params, residuals[dev])
        residuals[dev] = res if comm.error_feedback else None
        raw = RawUpdate(payload=payload, base_version=version, metrics={wire.NUM_EXAMPLES: float(n)})
        heapq.heappush(queue, (now + steps * profiles[dev].step_s, dispatches, dev, raw))
        busy.add(dev)
        dispatches += 1

    now = 0.0
    while state.version < a.versions:
        idle = [d for d in range(n_dev) if d not in busy]
        for d in rng.permutation(idle)[: max(0, a.concurrency - len(busy))]:
            dispatch(int(d), now)
        now, _, dev, raw = heapq.heappop(queue)
        busy.discard(dev)
        state.submit(raw, now)
    _, final = state.snapshot()
    load_trainable_state(model, {k: torch.from_numpy(v) for k, v in final.items()}, t.scope)
    res = evaluate(model, heldout)
    return {"accuracy": res["accuracy"], "virtual_time": now, "rejected": state.stats()["rejected"],
            **{k: v for k, v in res.items() if k.startswith("acc-")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default=str(ROOT / "simulations" / "scenarios" / "quickstart.toml"),
                    help="scenario TOML whose devices, data and base the variants share")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds each variant runs")
    ap.add_argument("--versions", type=int, default=0, help="global versions per run (0: the scenario's)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,... (repeatable; the first is the peer); default: the four server optimizers")
    ap.add_argument("--set", action="append", default=[], help="override a scenario key for every variant")
    ap.add_argument("--out", default="", help="write every run's result as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (one device trains at a time)")
    args = parse_quick(ap, scenario=str(ROOT / "simulations" / "scenarios" / "tiny.toml"), seeds="0", versions=2)
    torch.set_num_threads(args.threads)

    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig
    from fedge.simulations.evaluation import load_arrays
    from fedge.simulations.prepare import prepare
    from fedge.simulations.runner import default_cache

    over = parse_overrides(args.set)
    if args.versions:
        over["aggregation.versions"] = args.versions
    base_cfg = prepare(load_config(toml_path=args.scenario, overrides=over), default_cache(), progress=False)
    n_dev = base_cfg.simulation.devices
    devices = [local_data(base_cfg, NodeConfig(partition_id=i, num_partitions=n_dev), "train") for i in range(n_dev)]
    heldout = load_arrays(base_cfg.data.eval_path)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    results: dict[str, list[dict[str, Any]]] = {}
    for spec in args.variant or list(DEFAULT_VARIANTS):
        name, cfg = variant(base_cfg, spec)
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_federation(dataclasses.replace(cfg, seed=base_cfg.seed), devices, heldout, seed=seed)
            r["wall_s"] = time.perf_counter() - t0
            results.setdefault(name, []).append(r)
            print(f"{name:>12} seed {seed}: accuracy {r['accuracy']:.4f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.startswith("acc-"))
                  + f"  ({r['wall_s']:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    means = {k: float(np.mean([r["accuracy"] for r in v])) for k, v in results.items()}
    for k, v in results.items():
        accs = [r["accuracy"] for r in v]
        print(f"{k:>12}: mean {np.mean(accs):.4f}  min {min(accs):.4f}  max {max(accs):.4f}")
    peer = next(iter(means))
    best = max(means, key=lambda k: means[k])
    print(" ".join(f"{k}={v:.4f}" for k, v in means.items())
          + f" best={best} best_vs_peer={means[best] / max(means[peer], 1e-9):.3f}")


if __name__ == "__main__":
    main()
