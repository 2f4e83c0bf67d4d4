"""Top-k routing against dense (all experts): expert compute saved, accuracy and wall time relative to dense.

Both models share everything but the routing: same generated audio-visual data (with missing modalities
and noise), same initial weights, same steps. Top-k (default 8 experts, top-2, capacity factor 1.25) runs
each token through k experts, dense runs it through all E; both compute their experts batched
(:mod:`fedge.common.experts`: grouped by expert with one batched matmul per layer, or two wide matmuls for dense).
Expert FLOPs are counted from the tokens each expert actually processed on the test set (2 * multiply-adds of
fc1 + fc2; tokens over an expert's capacity are not processed and pass on the residual). The wall time of the
routed layer (router + experts, :meth:`MultimodalMoE.route`) over the test set is the fastest of 5 passes under
``torch.inference_mode`` (as a serving process runs), with one thread and with torch's default thread count; a
call sees one batch of 256 samples, about 400 tokens (40% of samples lack one modality).

Last line: ``compute_saved=<fraction of dense expert FLOPs saved> relative_accuracy=<top-k acc / dense acc>
routed_vs_dense_time=<top-k / dense routed-layer seconds, one thread> routed_vs_dense_time_threads=<same,
default threads>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedge.common.model import MultimodalMoE, build_model
from fedge.common.synthetic import make_av_dataset
from fedge.common.training import evaluate, forward_batch, to_batch, train_steps


def make_data(n: int, seed: int, missing: float) -> dict[str, np.ndarray]:
    """Noisy AV data; a fraction ``missing`` of samples lacks one modality (half image, half audio)."""
    d = make_av_dataset(n, seed=seed, image_noise=0.6, audio_snr_db=-9.0)
    rng = np.random.default_rng(seed + 1)
    r = rng.random(n)
    d["mask"][r < missing / 2, 0] = False
    d["mask"][(r >= missing / 2) & (r < missing), 1] = False
    return d


def expert_flops(model: MultimodalMoE, data: dict[str, np.ndarray], *, batch: int = 256,
                 repeats: int = 5, threads: int = 1) -> tuple[float, float]:
    """(expert FLOPs over ``data``, seconds in the routed layer: fastest of ``repeats`` passes) in eval mode."""
    e0 = model.experts[0]
    per_token = 2 * (e0.fc1.in_features * e0.fc1.out_features + e0.fc2.in_features * e0.fc2.out_features)
    model.eval()
    orig = model.route
    tokens, best = 0, float("inf")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for r in range(repeats):
            secs = 0.0

            def timed(*args: Any, **kwargs: Any) -> Any:  # wall time of router + experts only
                nonlocal secs
                t = time.perf_counter()
                out = orig(*args, **kwargs)
                secs += time.perf_counter() - t
                return out

            model.route = timed  # type: ignore[method-assign]
            try:
                with torch.inference_mode():
                    for s in range(0, len(data["label"]), batch):
                        out = forward_batch(model, to_batch(data, slice(s, s + batch)))
                        if r == 0:
                            tokens += int(out.expert_counts.sum()) - int(out.dropped_tokens)
            finally:
                model.route = orig  # type: ignore[method-assign]
            best = min(best, secs)
    finally:
        torch.set_num_threads(before)
    return float(tokens * per_token), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8, help="experts E")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token in top-k mode")
    ap.add_argument("--capacity-factor", type=float, default=1.25, help="top-k expert capacity factor")
    ap.add_argument("--train", type=int, default=2000, help="training samples")
    ap.add_argument("--test", type=int, default=1000, help="test samples")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    ap.add_argument("--seeds", type=int, default=2, help="independent runs averaged")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny run in seconds (checks that the benchmark works; figures not meaningful)")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.steps, args.seeds = 256, 256, 5, 1
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread for training: both modes alike on a shared machine
    acc: dict[str, list[float]] = {"topk": [], "dense": []}
    flops: dict[str, list[float]] = {"topk": [], "dense": []}
    secs: dict[str, list[float]] = {"topk": [], "dense": []}
    secs_mt: dict[str, list[float]] = {"topk": [], "dense": []}
    for seed in range(args.seeds):
        train = make_data(args.train, seed=100 + seed, missing=0.4)
        test = make_data(args.test, seed=900 + seed, missing=0.4)
        for mode in ("topk", "dense"):
            model = build_model(num_experts=args.experts, top_k=args.top_k, dense=mode == "dense",
                                capacity_factor=args.capacity_factor if mode == "topk" else 0.0, seed=seed)
            t0 = time.perf_counter()
            train_steps(model, train, steps=args.steps, batch_size=64, lr=3e-3, seed=seed,
                        modality_dropout_p=0.2, aux_weight=0.01)
            t_train = time.perf_counter() - t0
            res = evaluate(model, test)
            f, s = expert_flops(model, test, threads=1)
            _, s_mt = expert_flops(model, test, threads=default_threads)
            acc[mode].append(res["accuracy"])
            flops[mode].append(f)
            secs[mode].append(s)
            secs_mt[mode].append(s_mt)
            print(f"seed {seed} {mode:5s}: accuracy {res['accuracy']:.4f}  expert GFLOPs {f / 1e9:.4f}  "
                  f"routed-layer {s * 1e3:.1f} ms (1 thread) {s_mt * 1e3:.1f} ms ({default_threads} threads)  "
                  f"train {t_train:.1f} s", flush=True)
    a_top, a_dense = float(np.mean(acc["topk"])), float(np.mean(acc["dense"]))
    saved = 1.0 - float(np.sum(flops["topk"])) / float(np.sum(flops["dense"]))
    ratio = float(np.sum(secs["topk"])) / float(np.sum(secs["dense"]))
    ratio_mt = float(np.sum(secs_mt["topk"])) / float(np.sum(secs_mt["dense"]))
    print(f"E={args.experts} top-{args.top_k} capacity {args.capacity_factor}: accuracy top-k {a_top:.4f} "
          f"dense {a_dense:.4f}; expert FLOPs saved {saved:.3f}; routed-layer wall time top-k/dense {ratio:.3f} "
          f"(1 thread), {ratio_mt:.3f} ({default_threads} threads)")
    print(f"compute_saved={saved:.4f} relative_accuracy={a_top / a_dense:.4f} routed_vs_dense_time={ratio:.4f} "
          f"routed_vs_dense_time_threads={ratio_mt:.4f}")

if __name__ == "__main__":
    main()
