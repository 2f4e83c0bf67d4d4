"""Per-modality training metrics: routing statistics against a hand count, the JSONL + TensorBoard sink."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedge.cloud.metrics import MetricsLogger, modality_eval, read_metrics, routing_stats, token_modalities
from fedge.common.model import build_model
from fedge.common.synthetic import make_av_dataset
from fedge.common.training import forward_batch, to_batch


def test_token_modalities_follow_the_models_flattening_order() -> None:
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    assert token_modalities(mask).tolist() == [0, 1, 1, 0]


def test_routing_stats_match_a_hand_count_per_modality() -> None:
    model = build_model(num_experts=4, top_k=2)
    data = make_av_dataset(32, seed=0)
    data["mask"][:8, 1] = False
    b = to_batch(data, slice(0, 32))
    out = forward_batch(model, b)
    st = routing_stats(out, b["mask"], 4)
    mods = token_modalities(b["mask"])
    for j, m in enumerate(("image", "audio")):
        chosen = out.topk_idx[mods == j].reshape(-1)
        expect = np.bincount(chosen.numpy(), minlength=4) / chosen.numel()
        assert [st[f"load/{m}/e{e}"] for e in range(4)] == pytest.approx(expect.tolist())
        assert st[f"load_max/{m}"] == pytest.approx(expect.max())
        assert 0.0 <= st[f"router_entropy/{m}"] <= math.log(4) + 1e-6


def test_modality_eval_scores_each_modality_alone() -> None:
    model = build_model()
    data = make_av_dataset(40, seed=1)
    data["mask"][:10, 0] = False  # audio-only rows count for audio and all, not image
    res = modality_eval(model, to_batch(data, slice(0, 40)))
    assert set(res) == {f"{k}/{m}" for k in ("loss", "accuracy") for m in ("all", "image", "audio")}
    assert all(np.isfinite(v) for v in res.values())


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path) -> None:
    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "loss/image": 0.5, "checkpoint": True, "time": 1.0})
    log.log({"step": 2, "loss/image": float("nan")})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert list(tmp_path.glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="step"):
        MetricsLogger(tmp_path, tensorboard=False).log({"loss": 1.0})
    assert read_metrics(tmp_path / "missing.jsonl") == []
