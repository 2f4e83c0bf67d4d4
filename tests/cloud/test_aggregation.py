"""cloud/aggregation.py against NumPy references."""

import math

import numpy as np
import pytest

from fedge.cloud import aggregation as agg


def _deltas(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
            for _ in range(n)]


def _flat(d):
    return np.concatenate([d["a"].ravel(), d["b"].ravel()]).astype(np.float64)


@pytest.mark.parametrize("s", [0, 1, 3, 10])
def test_staleness_weights_match_their_formulas(s):
    assert agg.staleness_weight(s, fn="constant") == 1.0
    assert agg.staleness_weight(s, fn="sqrt") == pytest.approx(1 / math.sqrt(1 + s))
    assert agg.staleness_weight(s, fn="polynomial", a=0.7) == pytest.approx((1 + s) ** -0.7)
    want = 1.0 if s <= 4 else 1 / (0.5 * (s - 4) + 1)
    assert agg.staleness_weight(s, fn="hinge", a=0.5, b=4) == pytest.approx(want)


def test_staleness_weight_refuses_negative_and_unknown():
    with pytest.raises(ValueError):
        agg.staleness_weight(-1)
    with pytest.raises(ValueError):
        agg.staleness_weight(1, fn="bogus")


def test_fedbuff_is_example_weighted_mean_of_staleness_scaled_deltas():
    ds, s, n = _deltas(4), [0, 1, 2, 5], [10, 20, 30, 40]
    got = agg.fedbuff_delta(ds, s, n, fn="sqrt")
    w = np.array([1 / math.sqrt(1 + x) for x in s])
    ref = sum(ni * wi * _flat(d) for ni, wi, d in zip(n, w, ds)) / sum(n)
    np.testing.assert_allclose(_flat(got), ref, rtol=1e-5, atol=1e-6)


def test_fedavg_is_example_weighted_mean():
    ds, n = _deltas(3), [1, 2, 3]
    ref = sum(ni * _flat(d) for ni, d in zip(n, ds)) / 6
    np.testing.assert_allclose(_flat(agg.fedavg_delta(ds, n)), ref, rtol=1e-5, atol=1e-6)


def test_fedasync_scales_one_update_by_its_weight():
    d = _deltas(1)[0]
    got = agg.fedasync_delta(d, 3, fn="polynomial", a=0.5)
    np.testing.assert_allclose(_flat(got), _flat(d) * 4 ** -0.5, rtol=1e-6)


def test_median_and_trimmed_mean_match_numpy_and_resist_an_outlier():
    ds = _deltas(5)
    ds[0] = {k: v + 1e6 for k, v in ds[0].items()}  # one poisoned update
    stack = np.stack([_flat(d) for d in ds])
    np.testing.assert_allclose(_flat(agg.coordinate_median(ds)), np.median(stack, 0), rtol=1e-5)
    srt = np.sort(stack, 0)
    np.testing.assert_allclose(_flat(agg.trimmed_mean(ds, 0.2)), srt[1:4].mean(0), rtol=1e-5)
    assert np.abs(_flat(agg.fedbuff_delta(ds, [0] * 5, robust="median"))).max() < 10
    assert np.abs(_flat(agg.fedbuff_delta(ds, [0] * 5, robust="trimmed_mean", trim_ratio=0.2))).max() < 10


def test_clip_by_norm_bounds_the_global_norm_and_keeps_direction():
    d = _deltas(1)[0]
    norm = np.linalg.norm(_flat(d))
    assert agg.global_norm(d) == pytest.approx(norm, rel=1e-6)
    c, f = agg.clip_by_norm(d, norm / 2)
    assert agg.global_norm(c) == pytest.approx(norm / 2, rel=1e-5) and f == pytest.approx(0.5)
    np.testing.assert_allclose(_flat(c), _flat(d) / 2, rtol=1e-5)
    same, f1 = agg.clip_by_norm(d, norm * 2)
    assert f1 == 1.0
    np.testing.assert_array_equal(_flat(same), _flat(d))


def test_server_step_with_momentum_matches_heavy_ball_reference():
    p = {"a": np.zeros(3, np.float32)}
    m = None
    ref_p, ref_m = np.zeros(3), np.zeros(3)
    for t in range(4):
        d = {"a": np.full(3, t + 1.0, np.float32)}
        p, m = agg.server_step(p, d, m, lr=0.5, beta=0.9)
        ref_m = 0.9 * ref_m + (t + 1.0)
        ref_p = ref_p + 0.5 * ref_m
    np.testing.assert_allclose(p["a"], ref_p, rtol=1e-6)
    np.testing.assert_allclose(m["a"], ref_m, rtol=1e-6)


def _reference_opt(opt, deltas, *, lr, beta1, beta2, tau):
    """Reddi et al. Algorithm 2 (and FedAvgM), written out in float64 NumPy."""
    x, m, v = np.zeros(3), np.zeros(3), np.full(3, tau**2)
    for d in deltas:
        if opt == "sgd":
            x = x + lr * d
            continue
        if opt == "avgm":
            m = beta1 * m + d
            x = x + lr * m
            continue
        m = beta1 * m + (1 - beta1) * d
        if opt == "adam":
            v = beta2 * v + (1 - beta2) * d**2
        else:
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, m, v


@pytest.mark.parametrize("opt", ["sgd", "avgm", "adam", "yogi"])
def test_server_optimizers_match_numpy_reference(opt):
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0, s, 3) for s in (1.0, 0.1, 2.0, 0.5, 0.01)]
    kw = dict(lr=0.3, beta1=0.8, beta2=0.95, tau=1e-2)
    p, st = {"a": np.zeros(3, np.float32)}, {}
    for d in deltas:
        p, st = agg.server_opt_step(p, {"a": d.astype(np.float32)}, st, opt=opt, **kw)
    x, m, v = _reference_opt(opt, deltas, **kw)
    np.testing.assert_allclose(p["a"], x, rtol=1e-4, atol=1e-6)
    if opt != "sgd":
        np.testing.assert_allclose(st["m"]["a"], m, rtol=1e-4, atol=1e-7)
    if opt in ("adam", "yogi"):
        np.testing.assert_allclose(st["v"]["a"], v, rtol=1e-4, atol=1e-9)
    assert opt != "sgd" or st == {}


def test_adaptive_server_step_is_bounded_per_coordinate():
    # adam's first step moves every coordinate by about lr, however large or small its delta
    p, _ = agg.server_opt_step({"a": np.zeros(2, np.float32)}, {"a": np.array([1e3, 1e-1], np.float32)}, None,
                               opt="adam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    assert np.all(np.abs(p["a"]) <= 0.01 * 0.1 / np.sqrt(0.01) + 1e-6)
    with pytest.raises(ValueError):
        agg.server_opt_step({"a": np.zeros(1)}, {"a": np.zeros(1)}, None, opt="lamb")


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        agg.fedbuff_delta([], [])
    with pytest.raises(ValueError):
        agg.weighted_mean(_deltas(2), [0, 0])
    with pytest.raises(ValueError):
        agg.trimmed_mean(_deltas(2), 0.5)
    with pytest.raises(ValueError):
        agg.server_step({"a": np.zeros(1)}, {"b": np.zeros(1)}, None)


def test_default_server_lr_per_optimizer():
    assert agg.default_server_lr("sgd", 0.9) == 1.0
    assert agg.default_server_lr("avgm", 0.9) == pytest.approx(0.1)  # momentum with sgd's long-run step size
    assert agg.default_server_lr("adam", 0.9) == agg.default_server_lr("yogi", 0.0) == agg.ADAPTIVE_SERVER_LR
    with pytest.raises(ValueError):
        agg.default_server_lr("lamb", 0.9)
