"""Adapter-delta codec: compression ratio vs float32 and accumulated reconstruction error, with and without
error feedback, over 20 rounds of updates from real local training of the LoRA adapters.

Run: .venv/bin/python benchmarks/codec.py [--rounds 20] [--topk 0.05] [--bits 8]
Last line: ratio=... ef_error=... noef_error=...
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder
from tqdm import tqdm

from fedge.common.codec import CodecParams, decode, encode, raw_nbytes
from fedge.common.lora import adapter_state, apply_lora, load_adapter_state
from fedge.common.model import build_model
from fedge.common.synthetic import make_av_dataset
from fedge.common.training import train_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--bits", type=int, default=8, choices=(4, 8, 32))
    ap.add_argument("--steps", type=int, default=10, help="local training steps per round")
    args = parse_quick(ap, rounds=2, steps=2)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    model = apply_lora(build_model(seed=0), rank=4, alpha=8.0)
    data = make_av_dataset(400, seed=1)
    state = {k: v.numpy() for k, v in adapter_state(model).items()}
    res_ef: dict[str, np.ndarray] | None = None
    sum_true = {k: np.zeros_like(v) for k, v in state.items()}
    sum_ef = {k: np.zeros_like(v) for k, v in state.items()}
    sum_noef = {k: np.zeros_like(v) for k, v in state.items()}
    raw = sent = 0
    ef_curve, noef_curve = [], []
    for r in tqdm(range(args.rounds), desc="rounds"):
        load_adapter_state(model, {k: torch.from_numpy(v) for k, v in state.items()})
        train_steps(model, data, steps=args.steps, batch_size=32, lr=0.01, seed=r)
        new = {k: v.numpy() for k, v in adapter_state(model).items()}
        delta = {k: new[k] - state[k] for k in new}
        p_ef, res_ef = encode(delta, CodecParams(topk_ratio=args.topk, bits=args.bits), res_ef)
        p_no, _ = encode(delta, CodecParams(topk_ratio=args.topk, bits=args.bits, error_feedback=False))
        d_ef, d_no = decode(p_ef), decode(p_no)
        raw += raw_nbytes(delta)
        sent += len(p_ef)
        for k in delta:
            sum_true[k] += delta[k]
            sum_ef[k] += d_ef[k]
            sum_noef[k] += d_no[k]
        state = new  # the device follows its true trajectory; we measure what the server reconstructs

        def rel(acc: dict[str, np.ndarray]) -> float:
            num = np.sqrt(sum(float(((acc[k] - sum_true[k]) ** 2).sum()) for k in acc))
            den = np.sqrt(sum(float((sum_true[k] ** 2).sum()) for k in acc))
            return num / max(den, 1e-12)

        ef_curve.append(rel(sum_ef))
        noef_curve.append(rel(sum_noef))

    n_params = sum(v.size for v in state.values())
    print(f"adapter parameters: {n_params}; rounds: {args.rounds}; top-k {args.topk:.0%}, {args.bits}-bit")
    print(f"bytes per update: raw float32 {raw / args.rounds:.0f}, encoded {sent / args.rounds:.0f}")
    print("accumulated relative error by round (EF / no EF):")
    for i in range(0, args.rounds, max(1, args.rounds // 5)):
        print(f"  round {i + 1:2d}: {ef_curve[i]:.4f} / {noef_curve[i]:.4f}")
    print(f"ratio={raw / sent:.2f} ef_error={ef_curve[-1]:.4f} noef_error={noef_curve[-1]:.4f}")


if __name__ == "__main__":
    main()
