"""cloud/robust.py and the defaults of cloud/state.py that use it: caps, norm bounds, outliers, replays, versions."""

import itertools

import numpy as np
import pytest

from fedge.cloud import robust as rb
from fedge.cloud.state import AggregatorState
from fedge.cloud.validation import RawUpdate
from fedge.common import codec, wire

INIT = {"a": np.zeros((4, 5), np.float32), "b": np.zeros(6, np.float32)}
DENSE = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)
_SEEDS = itertools.count(1)


def _delta(scale=0.1, seed=None):
    rng = np.random.default_rng(next(_SEEDS) if seed is None else seed)
    return {k: (0.5 + rng.random(v.shape)).astype(np.float32) * np.float32(scale) for k, v in INIT.items()}


def _raw(base, delta=None, n=10.0):
    delta = _delta() if delta is None else delta
    return RawUpdate(payload=codec.encode(delta, DENSE)[0], base_version=base, metrics={wire.NUM_EXAMPLES: n})


def test_capped_examples_bounds_a_huge_claim_by_the_median_claim():
    assert rb.capped_examples([100, 100, 100, 1e12], [], factor=2.0) == [100, 100, 100, 200]
    # the window carries the median when a buffer is mostly liars
    assert rb.capped_examples([1e12, 1e12, 90], [100] * 8, factor=2.0) == [200, 200, 90]
    assert rb.capped_examples([1e12], [], factor=0.0, max_examples=500) == [500]
    assert rb.capped_examples([7, 1e9], [], factor=0.0) == [7, 1e9]


def test_norm_bound_is_relative_after_the_warmup_and_never_above_max_norm():
    assert rb.norm_bound([0.1, 0.1], factor=2.0, warmup=4, max_norm=100.0) == 100.0
    assert rb.norm_bound([0.1, 0.1, 0.2, 50.0], factor=2.0, warmup=4, max_norm=100.0) == pytest.approx(0.3)
    assert rb.norm_bound([500.0] * 5, factor=2.0, warmup=4, max_norm=100.0) == 100.0
    assert rb.norm_bound([0.1] * 5, factor=0.0, warmup=4, max_norm=100.0) == 100.0


def test_outlier_scores_single_out_a_sign_flip_and_a_far_update_against_a_window():
    honest = [_delta() for _ in range(8)]
    flipped = {k: -v for k, v in _delta().items()}
    far = {k: v * 20 for k, v in _delta().items()}
    s = rb.outlier_scores([honest[0], flipped, far], honest[1:])
    assert s[0] < 2.0 < s[1] and s[2] > s[1]
    assert np.allclose(rb.outlier_scores([honest[0], honest[1]], []), 1.0)  # too few to judge: all kept


def test_replay_guard_forgets_the_oldest_beyond_capacity():
    g = rb.ReplayGuard(2)
    for d in ("x", "y", "z"):
        g.add(d)
    assert "x" not in g and "y" in g and "z" in g and len(g) == 2
    assert rb.ReplayGuard(5, g.digests()).digests() == ["y", "z"]


def test_an_identical_update_is_accepted_once_then_refused_as_replay():
    st = AggregatorState(INIT, buffer_size=2)
    raw = _raw(0)
    assert st.submit(raw)["accepted"]
    r = st.submit(raw)
    assert not r["accepted"] and r["reason"] == "replay" and len(st.buffer) == 1
    assert st.stats()["rejections"] == {"replay": 1}


def test_a_claimed_base_version_other_than_the_dispatched_one_is_refused():
    st = AggregatorState(INIT, buffer_size=1, staleness="sqrt")
    for _ in range(3):
        st.submit(_raw(st.version), dispatched_version=st.version)
    r = st.submit(_raw(3), dispatched_version=1)  # claims the newest version to escape its staleness weight
    assert not r["accepted"] and r["reason"] == "version_mismatch" and st.version == 3
    r = st.submit(_raw(1), dispatched_version=1)
    assert r["accepted"] and r["staleness"] == 2


def test_a_claim_of_a_trillion_examples_weighs_like_twice_an_ordinary_device():
    st = AggregatorState(INIT, buffer_size=4, staleness="constant", norm_factor=0.0, outlier_threshold=0.0)
    honest = [_delta(0.1, seed=i) for i in range(3)]
    evil = {k: np.full(v.shape, -1.0, np.float32) for k, v in INIT.items()}
    for d in honest:
        st.submit(_raw(0, d, n=100.0))
    st.submit(_raw(0, evil, n=1e12))
    expect = {k: (sum(100 * d[k] for d in honest) + 200 * evil[k]) / 500 for k in INIT}
    for k in INIT:
        np.testing.assert_allclose(st.params[k], expect[k], rtol=1e-5)


def test_an_update_far_above_the_recent_norms_is_clipped_to_twice_their_median():
    st = AggregatorState(INIT, buffer_size=1, staleness="constant")
    for _ in range(4):
        st.submit(_raw(st.version, _delta(0.1)))
    ref = np.median(st.recent_norms)
    before = {k: v.copy() for k, v in st.params.items()}
    r = st.submit(_raw(st.version, _delta(1000.0)))
    assert r["accepted"] and st.clipped == 1
    step = np.sqrt(sum(np.sum((st.params[k] - before[k]) ** 2) for k in INIT))
    assert step == pytest.approx(2.0 * ref, rel=1e-4)


def test_outliers_are_left_out_of_the_version_when_the_threshold_is_set():
    st = AggregatorState(INIT, buffer_size=4, staleness="constant", outlier_threshold=3.0, norm_factor=0.0)
    for _ in range(8):  # two versions of honest updates fill the window
        st.submit(_raw(st.version))
    before = {k: v.copy() for k, v in st.params.items()}
    for _ in range(3):
        st.submit(_raw(st.version))
    st.submit(_raw(st.version, {k: np.full(v.shape, -50.0, np.float32) for k, v in INIT.items()}))
    assert st.outliers == 1 and st.stats()["outliers"] == 1
    assert all(np.all(st.params[k] > before[k]) for k in INIT)  # the flipped, scaled update did not count


def test_cosine_to_reference_is_negative_for_a_sign_flip_and_near_zero_for_noise():
    honest = [_delta() for _ in range(8)]
    flipped = {k: -v for k, v in _delta().items()}
    rng = np.random.default_rng(5)
    noise = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in INIT.items()}  # norms are bounded first
    c = rb.cosine_to_reference([honest[0], flipped, noise], honest[1:])
    assert c[0] > 0.8 and c[1] < -0.8 and abs(c[2]) < 0.5


def test_updates_pointing_away_from_the_median_are_left_out_when_min_cosine_is_set():
    st = AggregatorState(INIT, buffer_size=4, staleness="constant", min_cosine=0.0)
    for _ in range(4):
        st.submit(_raw(st.version))
    before = {k: v.copy() for k, v in st.params.items()}
    for _ in range(3):
        st.submit(_raw(st.version))
    st.submit(_raw(st.version, {k: -v for k, v in _delta().items()}))  # a plain sign flip: same norm
    assert st.outliers == 1
    assert all(np.all(st.params[k] > before[k]) for k in INIT)


def test_a_huge_update_in_the_very_first_buffer_is_clipped_to_the_buffers_median_norm():
    st = AggregatorState(INIT, buffer_size=4, staleness="constant", examples_factor=0.0, outlier_threshold=0.0)
    honest = [_delta(0.1, seed=i) for i in range(3)]
    for d in honest:
        st.submit(_raw(0, d))
    st.submit(_raw(0, {k: v * -500 for k, v in _delta(0.1, seed=9).items()}))  # no norm known yet at submit
    step = np.sqrt(sum(np.sum(st.params[k] ** 2) for k in INIT))
    assert st.clipped == 1 and step < 0.5 * max(np.sqrt(sum(np.sum(d[k] ** 2) for k in INIT)) for d in honest)
