"""Global training throughput on Ray Train: samples/s with 1 and 2 workers, per-modality bf16 against fp32.

Every run is the real :class:`fedge.cloud.training.GlobalTrainer` (TorchTrainer, DDP over gloo on CPU) on the same
generated audio-visual data, on an embedded Ray with as many CPUs as the machine has. Throughput is the
fastest of rank 0's report windows (samples per second across all workers, counting optimizer steps only; the
first window, with warm-up, is left out; checkpoints and evaluation are not in the window): on a shared
machine the fastest window is the one least disturbed by other jobs, as in "fastest of N" timing. bf16 runs the
image and audio encoders under bf16 autocast (``precision.image = precision.audio = "bf16"``), fp32 turns
autocast off; both with one worker so the ratio is the precision's, not the scaling's.

Last line: ``samples_per_s_1w=... samples_per_s_2w=... bf16_vs_fp32=<bf16 samples/s / fp32 samples/s>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.cloud.training import GlobalTrainer, initial_base
from fedge.common.config import load_config
from fedge.common.synthetic import make_av_dataset


def run(ds, store: str, *, workers: int, precision: str, steps: int, batch: int) -> dict[str, float]:
    """One training run; returns median samples/s and the final per-modality accuracy."""
    cfg = load_config(overrides={"precision.image": precision, "precision.audio": precision})
    tr = GlobalTrainer.from_config(cfg, workers=workers, cpus_per_worker=1.0, steps=steps, batch_size=batch,
                                   log_every=max(steps // 10, 1), checkpoint_every=steps, storage_path=store,
                                   use_gpu="off", modality_dropout=0.2)
    res = tr.train(initial_base(tr.mkw), None, ds, base_version=0, name=f"bench-{workers}w-{precision}")
    rates = [float(r["samples_per_s"]) for r in res.metrics[1:]] or [float(res.metrics[-1]["samples_per_s"])]
    last = res.metrics[-1]
    out = {"samples_per_s": float(np.max(rates)), "accuracy": float(last["accuracy/all"]),
           "loss": res.last_loss(), "seconds": res.seconds}
    print(f"{workers} worker(s) {precision}: {out['samples_per_s']:.0f} samples/s (fastest of {len(rates)} "
          f"reports), final batch accuracy {out['accuracy']:.3f}, wall {res.seconds:.1f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=64, help="batch size per worker")
    ap.add_argument("--samples", type=int, default=1024, help="generated training samples")
    args = parse_quick(ap, steps=10, samples=128)
    import ray

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=max(cpus, 2), include_dashboard=False, log_to_driver=False)
    data = make_av_dataset(args.samples, seed=21)
    ds = ray.data.from_items([{k: data[k][i] for k in data} for i in range(args.samples)]).materialize()
    print(f"machine: {cpus} CPUs visible, load average {os.getloadavg()[0]:.1f} (shared machines skew these)")
    with tempfile.TemporaryDirectory(prefix="fedge-bench-train-") as store:
        one = run(ds, store, workers=1, precision="fp32", steps=args.steps, batch=args.batch)
        two = run(ds, store, workers=2, precision="fp32", steps=args.steps, batch=args.batch)
        bf16 = run(ds, store, workers=1, precision="bf16", steps=args.steps, batch=args.batch)
    ray.shutdown()
    print(f"2 workers / 1 worker: {two['samples_per_s'] / one['samples_per_s']:.2f}x; "
          f"bf16 / fp32 (1 worker): {bf16['samples_per_s'] / one['samples_per_s']:.2f}x, "
          f"accuracy bf16 {bf16['accuracy']:.3f} vs fp32 {one['accuracy']:.3f}")
    print(f"samples_per_s_1w={one['samples_per_s']:.1f} samples_per_s_2w={two['samples_per_s']:.1f} "
          f"bf16_vs_fp32={bf16['samples_per_s'] / one['samples_per_s']:.3f}")


if __name__ == "__main__":
    main()
