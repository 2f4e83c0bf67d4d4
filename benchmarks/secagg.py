"""Secure aggregation vs plain compressed updates: the same federation, 30 % dropout, in one run.

Both runs use the very ServerApp and ClientApp on Flower's simulation engine (one subprocess each, its own
Ray), the same synthetic partitions, seed and device profiles with ``profiles.dropout`` (a dispatched device
drops out with that probability; in the secure run a member also drops out of the unmasking with it). The
plain run sends top-k + 8-bit updates with error feedback (``communication.*``); the secure run masks a
shared random half of the coordinates, ternary (``aggregation.secure = true``, docs/secure_aggregation.md).

Per update: bytes uploaded (secure: masked vector, sealed shares and the key round, per sender), device
seconds (local training, measured once here on the same model and data size, plus the encoding: the codec
vs key round + masking + one unmasking answer) and server seconds (decode + validate vs unmasking a group).
``dropout_tolerated``: the largest fraction of a group's members that may be gone at the unmasking (half
before sending, half after) for which the unmasked sum is still exact, swept on groups of 5 and 10.

    .venv/bin/python benchmarks/secagg.py [--quick]

Last line: ``secagg_accuracy_delta_pts=… secagg_bytes_ratio=… secagg_device_s_ratio=… dropout_tolerated=…``
(accuracy points secure minus plain; ratios secure / plain).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(run_dir: str, nodes: int, overrides: list[str]) -> None:
    """One simulation (runs in a subprocess: ``run_simulation`` owns and shuts down its Ray)."""
    import dataclasses

    from flwr.simulation import run_simulation

    from fedge.cloud.server_app import app as server_app
    from fedge.common.config import load_config, parse_overrides
    from fedge.common.synthetic import make_av_dataset
    from fedge.edge.client_app import app as client_app

    cfg = load_config(overrides=parse_overrides(overrides))
    cfg = dataclasses.replace(cfg, run_dir=str(Path(run_dir).resolve()))
    m, held = cfg.model, Path(run_dir) / "heldout.npz"
    held.parent.mkdir(parents=True, exist_ok=True)
    np.savez(held, **make_av_dataset(cfg.data.eval_samples, seed=cfg.seed * 100_003 + 99_991,
                                     num_classes=m.num_classes, image_size=m.image_size, n_mels=m.n_mels,
                                     frames=m.audio_frames))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=str(held)))
    os.environ["FEDGE_RUN_CONFIG"] = str(cfg.save(cfg.run_dir))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


def _overrides(args: argparse.Namespace, secure: bool) -> list[str]:
    return ['data.source="synthetic"', f"data.samples_per_device={args.samples}",
            f"data.eval_samples={args.eval_samples}", f"seed={args.seed}", f"train.local_steps={args.local_steps}",
            'aggregation.mode="async"', f"aggregation.buffer_size={args.k}",
            f"aggregation.concurrency={args.devices}", f"aggregation.versions={args.versions}",
            f"aggregation.max_staleness={args.versions}", f"profiles.dropout={args.dropout}",
            f"aggregation.secure={'true' if secure else 'false'}", f"aggregation.secure_clip={args.clip}",
            "fault_tolerance.checkpoint_every=1000", *(args.secure_set if secure else [])]


def _run(name: str, run_dir: Path, args: argparse.Namespace, secure: bool) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(args.devices),
                        *_overrides(args, secure)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=args.timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    from fedge.common.run_log import Event, read_events, read_versions

    recs, events = read_versions(run_dir), read_events(run_dir)
    updates = sum(x.updates or 0 for x in recs)
    up = sum(x.upload_bytes or 0 for x in recs)
    groups = [e.fields for e in events if e.event == Event.SECAGG_GROUP]
    out = {"accuracy": float(recs[-1].accuracy), "bytes": up / max(updates, 1), "updates": updates,
           "rejected": recs[-1].rejected, "groups": groups,
           "discarded": sum(1 for e in events if e.event == Event.SECAGG_DISCARDED)}
    print(f"{name:8s}: {len(recs)} versions, final accuracy {out['accuracy']:.3f}, {updates} updates, "
          f"{out['bytes']:.0f} B/update, rejected {out['rejected']} ({time.perf_counter() - t0:.0f}s wall)",
          flush=True)
    print(f"{name:8s}: accuracy by version " + " ".join(f"{x.accuracy:.2f}" for x in recs), flush=True)
    if groups:
        gone = [1 - e["holders"] / e["members"] for e in groups]
        print(f"{name:8s}: {len(groups)} groups unmasked, {out['discarded']} discarded; members gone at the "
              f"unmasking: mean {np.mean(gone):.2f}, max {max(gone):.2f}; senders per group "
              f"{np.mean([e['senders'] for e in groups]):.1f} of {groups[0]['members']}", flush=True)
    return out


def _timings(args: argparse.Namespace) -> dict[str, float]:
    """Device and server seconds per update on the run's model: training, encodings, unmasking (medians)."""
    import torch

    from fedge.cloud.builders import global_model
    from fedge.cloud.validation import RawUpdate, validate
    from fedge.common import codec, wire
    from fedge.common import secagg as sa
    from fedge.common.config import load_config
    from fedge.common.scope import set_trainable, trainable_state
    from fedge.common.synthetic import make_av_dataset
    from fedge.common.training import train_steps

    torch.set_num_threads(1)
    cfg = load_config(overrides={"data.source": "synthetic"})
    model = global_model(cfg)
    set_trainable(model, cfg.train.scope)
    m = cfg.model
    data = make_av_dataset(args.samples, seed=1, num_classes=m.num_classes, image_size=m.image_size,
                           n_mels=m.n_mels, frames=m.audio_frames)
    t0 = time.perf_counter()
    train_steps(model, data, steps=args.local_steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr)
    train_s = time.perf_counter() - t0
    ref = {k: v.detach().numpy().copy() for k, v in trainable_state(model, cfg.train.scope).items()}
    rng = np.random.default_rng(0)
    deltas = [{k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in ref.items()}
              for _ in range(args.k)]
    comm = cfg.communication
    params = codec.CodecParams(topk_ratio=comm.topk_ratio, bits=comm.quant_bits, error_feedback=True)
    reps = 5

    def med(fn) -> float:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    codec_s = med(lambda: codec.encode(deltas[0], params, None))
    payloads = [codec.encode(d, params, None)[0] for d in deltas]
    validate_s = med(lambda: [validate(RawUpdate(p, 0, {wire.NUM_EXAMPLES: 1.0}), reference=ref, current_version=0,
                                       oldest_version=0, max_staleness=10, max_norm=100.0) for p in payloads])
    n = sum(v.size for v in ref.values())
    k = max(1, round(cfg.aggregation.secure_keep * n))
    spec, cs, keys = _group(args.k, n, k, args.clip, cfg.aggregation.secure_levels)
    flats = [sa.flatten(d)[0] for d in deltas]
    mask_s = med(lambda: sa.member_mask(flats[0], spec, 0, cs[0][0], keys[0][0], rng))
    keys_s = med(lambda: sa.member_keys(spec.group_id, 0, cs[0][0], spec.c_pks, spec.t))
    ups = {i: sa.member_mask(flats[i], spec, i, cs[i][0], keys[i][0], rng)[0] for i in range(args.k - 1)}
    dropped = [args.k - 1]
    reveal = lambda h: sa.member_reveal(spec, h, cs[h][0], {i: ups[i].sealed_b[h] for i in ups},
                                        {j: keys[j][1].sealed_s[h] for j in dropped}, sorted(ups), dropped)
    reveal_s = med(lambda: reveal(0))
    answers = {h: reveal(h) for h in range(spec.t)}
    unmask_s = med(lambda: sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, answers))
    return {"train_s": train_s, "codec_s": codec_s, "secure_s": keys_s + mask_s + reveal_s,
            "validate_s": validate_s / args.k, "unmask_s": unmask_s / len(ups)}


def _group(size: int, n: int, k: int, clip: float, levels: int = 1):
    from fedge.common import secagg as sa

    cs = [sa.new_keypair() for _ in range(size)]
    c_pks = tuple(pk for _, pk in cs)
    t = sa.threshold(size, 0.6)
    keys = [sa.member_keys("bench", i, cs[i][0], c_pks, t) for i in range(size)]
    return sa.GroupSpec("bench", c_pks, tuple(a.s_pk for _, a in keys), t, n, k, clip, levels), cs, keys


def _dropout_tolerated(sizes: tuple[int, ...] = (5, 10), n: int = 4000, k: int = 400) -> float:
    """The largest fraction of members gone at the unmasking (half before sending, half after) that every
    group size still unmasks exactly."""
    from fedge.common import secagg as sa

    worst = 1.0
    rng = np.random.default_rng(0)
    for size in sizes:
        spec, cs, keys = _group(size, n, k, 1.0)
        best = 0.0
        for gone in range(size + 1):
            before = list(range(gone // 2))  # never sent
            after = list(range(gone // 2, gone))  # sent, then vanished
            ups, sent = {}, {}
            for i in range(size):
                if i in before:
                    continue
                x = (rng.standard_normal(n) * 0.01).astype(np.float32)
                ups[i], sent[i] = sa.member_mask(x, spec, i, cs[i][0], keys[i][0], rng)
            holders = [h for h in range(size) if h not in before and h not in after]
            dropped = [j for j in range(size) if j not in ups]
            try:
                answers = {h: sa.member_reveal(spec, h, cs[h][0], {i: ups[i].sealed_b[h] for i in ups},
                                               {j: keys[j][1].sealed_s[h] for j in dropped}, sorted(ups), dropped)
                           for h in holders}
                total = sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, answers)
            except sa.SecAggError:
                break
            if not np.allclose(total, sum(sent.values()), atol=1e-6):
                break
            best = gone / size
        print(f"group of {size} (t={spec.t}): exact with {best:.0%} of members gone at the unmasking", flush=True)
        worst = min(worst, best)
    return worst


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small federation (5 devices, 6 versions): minutes")
    p.add_argument("--devices", type=int, default=10, help="simulated devices (= concurrency)")
    p.add_argument("--k", type=int, default=5, help="buffer size K (the secure group size)")
    p.add_argument("--versions", type=int, default=20, help="global versions per run")
    p.add_argument("--local-steps", type=int, default=8, help="local optimizer steps per update")
    p.add_argument("--samples", type=int, default=150, help="training samples per device")
    p.add_argument("--eval-samples", type=int, default=300, help="held-out samples the server evaluates on")
    p.add_argument("--dropout", type=float, default=0.3, help="probability a device drops out (each dispatch)")
    p.add_argument("--clip", type=float, default=1.0, help="aggregation.secure_clip of the secure run")
    p.add_argument("--seeds", type=int, default=3, help="run seeds (data, profiles, dispatch order): the figures "
                   "are means over them (masks, index sets and rounding are random in every secure run)")
    p.add_argument("--set", dest="secure_set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the secure run only, e.g. aggregation.secure_keep=0.4 (repeatable)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = p.parse_args()
    if args.quick:
        args.devices, args.versions, args.samples, args.eval_samples, args.local_steps = 5, 6, 100, 200, 6
        args.seeds = 1
    runs: dict[str, list[dict]] = {"plain": [], "secure": []}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-secagg-") as tmp:
        for seed in range(args.seeds):
            args.seed = seed
            for name in runs:
                runs[name].append(_run(f"{name}/{seed}", Path(tmp) / f"{name}-{seed}", args, secure=name == "secure"))
    plain, secure = ({k: float(np.mean([r[k] for r in rs])) for k in ("accuracy", "bytes")} for rs in runs.values())
    print(f"mean over {args.seeds} seed(s): plain {plain['accuracy']:.3f} ({plain['bytes']:.0f} B/update), "
          f"secure {secure['accuracy']:.3f} ({secure['bytes']:.0f} B/update)")
    tm = _timings(args)
    dev_plain, dev_secure = tm["train_s"] + tm["codec_s"], tm["train_s"] + tm["secure_s"]
    print(f"device s/update: plain {dev_plain:.4f} (train {tm['train_s']:.4f} + codec {tm['codec_s']:.4f}), "
          f"secure {dev_secure:.4f} (+ keys, masking, one unmasking answer {tm['secure_s']:.4f})")
    print(f"server s/update: plain validate {tm['validate_s']:.5f}, secure unmask {tm['unmask_s']:.5f} "
          f"(server_s_ratio={tm['unmask_s'] / tm['validate_s']:.2f})")
    tol = _dropout_tolerated()
    print(f"secagg_accuracy_delta_pts={100 * (secure['accuracy'] - plain['accuracy']):.2f} "
          f"secagg_bytes_ratio={secure['bytes'] / plain['bytes']:.2f} "
          f"secagg_device_s_ratio={dev_secure / dev_plain:.3f} dropout_tolerated={tol:.2f}")


if __name__ == "__main__":
    main()
