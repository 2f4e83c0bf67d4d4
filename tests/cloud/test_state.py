"""cloud/state.py: buffering, versions, refusals that leave the model alone, checkpoints, rebase, Ray actor."""

import itertools

import numpy as np
import pytest

from fedge.cloud.state import ACTOR_NAME, AggregatorState, CheckpointError, start_actor
from fedge.cloud.validation import RawUpdate
from fedge.common import codec, wire
from fedge.common.fsio import atomic_write

INIT = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
DENSE = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)


_UNIQUE = itertools.count(1)


def _raw(base, value=0.1, n=10.0):
    """An update of ``value`` everywhere; the last value of "b" differs a little per call (no replays)."""
    delta = {k: np.full(v.shape, value, np.float32) for k, v in INIT.items()}
    delta["b"][-1] += np.float32(1e-6 * next(_UNIQUE))
    return RawUpdate(payload=codec.encode(delta, DENSE)[0], base_version=base, metrics={wire.NUM_EXAMPLES: n})


def _state(tmp_path=None, **kw):
    opts = dict(buffer_size=2, staleness="constant", max_staleness=2, checkpoint_every=1,
                checkpoint_dir=str(tmp_path) if tmp_path else None)
    opts.update(kw)
    return AggregatorState(INIT, **opts)


def test_k_updates_make_one_version_with_their_mean():
    st = _state()
    assert st.submit(_raw(0, 0.1))["new_version"] is None
    r = st.submit(_raw(0, 0.3))
    assert r["accepted"] and r["new_version"] == 1
    np.testing.assert_allclose(st.params["a"], 1.2, rtol=1e-6)
    assert st.history[-1]["updates"] == 2


def test_stale_update_is_dropped_and_counted():
    st = _state(buffer_size=1)
    for _ in range(4):
        st.submit(_raw(st.version))
    before = {k: v.copy() for k, v in st.params.items()}
    r = st.submit(_raw(0))  # staleness 4 > 2
    assert not r["accepted"] and r["reason"] == "stale"
    assert st.stats()["rejections"] == {"stale": 1}
    for k in before:
        np.testing.assert_array_equal(st.params[k], before[k])


def test_bad_update_leaves_model_and_buffer_untouched():
    st = _state(buffer_size=1)
    bad = RawUpdate(payload=b"garbage" * 10, base_version=0, metrics={})
    r = st.submit(bad)
    assert r["reason"] == "decode" and st.version == 0 and not st.buffer
    np.testing.assert_array_equal(st.params["a"], INIT["a"])


def test_checkpoint_roundtrip_keeps_buffer_momentum_and_counters(tmp_path):
    st = _state(tmp_path, server_opt="avgm", beta1=0.5)
    st.submit(_raw(0))
    st.submit(_raw(0))  # version 1, checkpointed
    st.submit(_raw(1, 0.2))  # buffered
    st.submit(RawUpdate(payload=b"x", base_version=1, metrics={}))
    st.checkpoint()
    back = AggregatorState.restore(str(tmp_path), checkpoint_every=1)
    assert back.version == 1 and len(back.buffer) == 1 and back.stats()["rejections"] == {"decode": 1}
    np.testing.assert_array_equal(back.params["a"], st.params["a"])
    np.testing.assert_array_equal(back.opt_state["m"]["b"], st.opt_state["m"]["b"])
    np.testing.assert_array_equal(back.buffer[0]["delta"]["a"], st.buffer[0]["delta"]["a"])
    assert back.submit(_raw(1, 0.2))["new_version"] == 2  # the buffered update was not lost
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("opt", ["avgm", "adam", "yogi"])
def test_server_optimizer_state_survives_checkpoint_and_resume(tmp_path, opt):
    # Prepare: a state checkpointed after version 2
    straight = _state(tmp_path, server_opt=opt, server_lr=0.1, buffer_size=1)
    for i, value in enumerate((0.1, -0.3)):
        straight.submit(_raw(i, value))
    straight.checkpoint()
    # Execute: the resumed state and the uninterrupted one take the same third step
    back = AggregatorState.restore(str(tmp_path), checkpoint_every=1)
    back.submit(_raw(2, 0.2))
    straight.submit(_raw(2, 0.2))
    # Assert: the same slots and parameters (a lost first or second moment would change the step by far more)
    assert sorted(back.opt_state) == sorted(straight.opt_state) != []
    for slot in straight.opt_state:
        for k in INIT:
            np.testing.assert_allclose(back.opt_state[slot][k], straight.opt_state[slot][k], rtol=1e-4, atol=1e-6)
    for k in INIT:
        np.testing.assert_allclose(back.params[k], straight.params[k], rtol=1e-4, atol=1e-6)


def test_rebase_clears_the_server_optimizer_state():
    st = _state(server_opt="adam", server_lr=0.1, buffer_size=1)
    st.submit(_raw(0))
    assert st.opt_state
    st.rebase({"w": np.zeros(2, np.float32)}, 1)
    assert st.opt_state == {}


def test_restore_refuses_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        AggregatorState.restore(str(tmp_path))
    atomic_write(tmp_path / "aggregator.npz", b"not a zip")
    with pytest.raises(CheckpointError):
        AggregatorState.restore(str(tmp_path))


def test_rebase_resets_adapters_and_refuses_updates_from_the_old_base(tmp_path):
    st = _state(tmp_path, buffer_size=1)
    st.submit(_raw(0))
    st.submit(_raw(1))
    v = st.rebase({"w": np.ones(2, np.float32)}, base_version=1)
    assert v == 3 and st.base_version == 1 and st.oldest_version == 3
    np.testing.assert_array_equal(st.params["a"], INIT["a"])
    assert st.submit(_raw(2))["reason"] == "unknown_version"
    assert st.submit(_raw(3))["new_version"] == 4
    with pytest.raises(ValueError):
        st.rebase({}, base_version=1)
    back = AggregatorState.restore(str(tmp_path))
    assert back.base_version == 1 and back.oldest_version == 3 and "w" in back.base_state


@pytest.mark.integration
def test_state_runs_as_a_ray_actor(ray_session, tmp_path):
    ray = ray_session
    actor = start_actor(None, initial=INIT, buffer_size=1, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    r = ray.get(actor.submit.remote(_raw(0), 1.5))
    assert r["new_version"] == 1
    v, params = ray.get(actor.snapshot.remote())
    assert v == 1 and params["a"][0, 0] == pytest.approx(1.1)
    restored = AggregatorState.restore(str(tmp_path))
    actor2 = start_actor(restored, name="fedge-test-aggregator-2")
    assert ray.get(actor2.get_version.remote()) == 1
    named = ray.get_actor(ACTOR_NAME)  # how global training finds the aggregator to rebase it
    assert ray.get(named.rebase.remote({"w": np.ones(1, np.float32)}, 1)) == 2
    ray.kill(actor)
    ray.kill(actor2)


def test_any_failure_while_checking_an_update_is_a_counted_refusal_not_an_exception(monkeypatch):
    import fedge.cloud.state as state_mod

    def boom(*a, **kw):
        raise MemoryError("declared 8 GiB")

    st = _state(buffer_size=1)
    monkeypatch.setattr(state_mod, "validate", boom)
    r = st.submit(_raw(0))
    assert not r["accepted"] and r["reason"] == "invalid" and "MemoryError" in r["detail"]
    assert st.stats()["rejections"] == {"invalid": 1} and st.version == 0 and not st.buffer
