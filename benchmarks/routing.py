"""Top-k routing against dense (all experts): expert compute saved and accuracy relative to dense.

Both models share everything but the routing: same generated audio-visual data (with missing modalities
and noise), same initial weights, same steps. Top-k (default 8 experts, top-2, capacity factor 1.25) runs
each token through k experts, dense runs it through all E. Expert FLOPs are counted from the tokens each
expert actually processed on the test set (2 * multiply-adds of fc1 + fc2; tokens over an expert's capacity
are not processed and pass on the residual); the wall time of the routed layer is measured too, fastest of 5
passes (on a small CPU model a Python dispatch loop can eat the FLOP savings: reported, not hidden).

Last line: ``compute_saved=<fraction of dense expert FLOPs saved> relative_accuracy=<top-k acc / dense acc>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.model import MultimodalMoE, build_model
from common.synthetic import make_av_dataset
from common.training import evaluate, forward_batch, to_batch, train_steps


def make_data(n: int, seed: int, missing: float) -> dict[str, np.ndarray]:
    """Noisy AV data; a fraction ``missing`` of samples lacks one modality (half image, half audio)."""
    d = make_av_dataset(n, seed=seed, image_noise=0.6, audio_snr_db=-9.0)
    rng = np.random.default_rng(seed + 1)
    r = rng.random(n)
    d["mask"][r < missing / 2, 0] = False
    d["mask"][(r >= missing / 2) & (r < missing), 1] = False
    return d


def expert_flops(model: MultimodalMoE, data: dict[str, np.ndarray], batch: int = 256,
                 repeats: int = 5) -> tuple[float, float]:
    """(expert FLOPs over ``data``, seconds in the routed layer: fastest of ``repeats`` passes) in eval mode."""
    e0 = model.experts[0]
    per_token = 2 * (e0.fc1.in_features * e0.fc1.out_features + e0.fc2.in_features * e0.fc2.out_features)
    model.eval()
    orig = model.route
    tokens, best = 0, float("inf")
    for r in range(repeats):
        secs = 0.0

        def timed(x: torch.Tensor, q: torch.Tensor):  # wall time of router + experts only
            nonlocal secs
            t = time.perf_counter()
            out = orig(x, q)
            secs += time.perf_counter() - t
            return out

        model.route = timed  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                for s in range(0, len(data["label"]), batch):
                    out = forward_batch(model, to_batch(data, slice(s, s + batch)))
                    if r == 0:
                        tokens += int(out.expert_counts.sum()) - int(out.dropped_tokens)
        finally:
            model.route = orig  # type: ignore[method-assign]
        best = min(best, secs)
    return float(tokens * per_token), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--train", type=int, default=2000, help="training samples")
    ap.add_argument("--test", type=int, default=1000, help="test samples")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    ap.add_argument("--seeds", type=int, default=2, help="independent runs averaged")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: stable timings on a shared machine; both modes alike
    acc: dict[str, list[float]] = {"topk": [], "dense": []}
    flops: dict[str, list[float]] = {"topk": [], "dense": []}
    secs: dict[str, list[float]] = {"topk": [], "dense": []}
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
            f, s = expert_flops(model, test)
            acc[mode].append(res["accuracy"])
            flops[mode].append(f)
            secs[mode].append(s)
            print(f"seed {seed} {mode:5s}: accuracy {res['accuracy']:.4f}  expert GFLOPs {f / 1e9:.4f}  "
                  f"routed-layer {s * 1e3:.1f} ms  train {t_train:.1f} s", flush=True)
    a_top, a_dense = float(np.mean(acc["topk"])), float(np.mean(acc["dense"]))
    saved = 1.0 - float(np.sum(flops["topk"])) / float(np.sum(flops["dense"]))
    lat_saved = 1.0 - float(np.sum(secs["topk"])) / float(np.sum(secs["dense"]))
    print(f"E={args.experts} top-{args.top_k} capacity {args.capacity_factor}: accuracy top-k {a_top:.4f} "
          f"dense {a_dense:.4f}; expert FLOPs saved {saved:.3f}; routed-layer wall time saved {lat_saved:.3f}")
    print(f"compute_saved={saved:.4f} relative_accuracy={a_top / a_dense:.4f}")


if __name__ == "__main__":
    main()
