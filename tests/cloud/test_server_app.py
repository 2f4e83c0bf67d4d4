"""The ServerApp loop and its clock: virtual-time ordering, device profiles, and end to end over Flower's
simulation engine with uneven devices and hostile updates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.cloud import clock as clk

ROOT = Path(__file__).resolve().parents[2]


def test_profiles_are_deterministic_with_an_exact_straggler_fraction():
    kw = dict(seed=3, straggler_fraction=0.2, straggler_slowdown_min=5, straggler_slowdown_max=10)
    a = [clk.device_profile(i, 20, **kw) for i in range(20)]
    b = [clk.device_profile(i, 20, **kw) for i in range(20)]
    assert a == b
    assert sum(p.straggler for p in a) == 4
    fast = np.median([p.step_s for p in a if not p.straggler])
    assert all(p.step_s > 2.5 * fast for p in a if p.straggler)
    with pytest.raises(ValueError):
        clk.device_profile(20, 20, seed=0)


def test_arrival_time_adds_download_compute_and_upload():
    p = clk.DeviceProfile(step_s=0.5, bandwidth_bps=8e6, straggler=False)
    assert clk.arrival_time(10.0, p, local_steps=4, download_bytes=1e6, upload_bytes=2e6) == pytest.approx(
        10.0 + 1.0 + 2.0 + 2.0)


def test_virtual_queue_releases_replies_in_virtual_time_order_only():
    vc = clk.VirtualClock()
    q = clk.ArrivalQueue(vc)
    q.dispatched("slow", 0.5)
    q.dispatched("fast", 0.1)
    q.arrived("slow", 9.0, "S")  # real order: the slow one's reply comes first
    assert q.pop() is None  # "fast" may still arrive before 9.0
    q.arrived("fast", 1.0, "F")
    assert q.pop() == (1.0, "F") and vc.now() == 1.0
    assert q.pop() == (9.0, "S") and vc.now() == 9.0
    q.dispatched("lost", 9.0)
    q.cancel("lost")
    assert q.inflight == 0 and q.pop() is None


def test_virtual_queue_breaks_ties_by_dispatch_order_not_by_arrival():
    q = clk.ArrivalQueue(clk.VirtualClock())
    for key in ("a", "b"):
        q.dispatched(key, 0.0)
    q.arrived("b", 1.0, "B", order=1)  # same virtual time; b's reply happened to come back first
    q.arrived("a", 1.0, "A", order=0)
    assert [q.pop(), q.pop()] == [(1.0, "A"), (1.0, "B")]


def test_real_queue_releases_in_arrival_order():
    q = clk.ArrivalQueue(clk.RealClock())
    q.dispatched("x", 0.0)
    q.arrived("y", 2.0, "Y")
    assert q.pop() == (2.0, "Y")


def _simulate(tmp_path, nodes, client, *sets, timeout=300):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tests.cloud.sim_main", str(run_dir), str(nodes), client, *sets],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, recs, r.stdout


@pytest.mark.integration
def test_async_over_simulation_engine_with_stragglers_and_hostile_nodes(tmp_path):
    run_dir, recs, out = _simulate(
        tmp_path, 10, "tests.cloud.adversarial_app:app",
        "aggregation.mode=\"async\"", "aggregation.versions=8", "aggregation.concurrency=8",
        "aggregation.buffer_size=2", "aggregation.max_staleness=1", "aggregation.max_norm=50.0",
        "aggregation.norm_action=\"reject\"", "profiles.straggler_fraction=0.2", "train.local_steps=6",
        "data.samples_per_device=100", "data.eval_samples=200", "fault_tolerance.checkpoint_every=2",
    )
    assert [r["version"] for r in recs] == list(range(1, 9))
    assert "[fedge] version   8  accuracy" in out
    times = [r["virtual_time"] for r in recs]
    assert times == sorted(times)
    rej = recs[-1]["rejected"]
    # five hostile devices: NaN, Inf, garbage, wrong shape, huge norm — each refused and counted
    assert rej.get("nonfinite", 0) >= 2 and rej.get("decode", 0) >= 1
    assert rej.get("keys", 0) + rej.get("shape", 0) >= 1 and rej.get("norm", 0) >= 1
    # 5-10x slower devices: versions kept coming while they trained, so their updates came back too stale
    assert rej.get("stale", 0) >= 1
    assert max(s for r in recs for s in r["staleness"]) >= 1
    with np.load(run_dir / "global_adapters.npz") as z:
        assert all(np.all(np.isfinite(z[k])) for k in z.files)
    assert recs[-1]["accuracy"] > 0.2  # chance is 0.1: the refused updates never reached the model
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped" and events[-1]["last_checkpoint_version"] == 8


def test_a_server_resumed_after_global_training_evaluates_and_dispatches_the_new_base(tmp_path, ray_session):
    """A checkpoint taken after a rebase holds the trained base: a restarted server loads it for its own
    evaluation and publishes it as the version its messages name."""
    import torch

    from fedge.cloud.builders import global_model, state_kwargs
    from fedge.cloud.server_loop import ServerLoop
    from fedge.cloud.state import AggregatorState, start_actor
    from fedge.cloud.training import fresh_adapters
    from fedge.common.config import load_config
    from fedge.common.lora import adapter_state, base_state
    from fedge.common.model import build_model, model_kwargs

    cfg = load_config(overrides={"publish.onnx": False})
    mkw = model_kwargs(cfg)
    initial = {k: v.numpy() for k, v in adapter_state(global_model(cfg)).items()}
    st = AggregatorState(initial, **state_kwargs(cfg, str(tmp_path / "ck")))
    trained = {k: v.numpy() for k, v in base_state(build_model(**{**mkw, "seed": 77})).items()}
    fresh = {k: v.numpy() for k, v in fresh_adapters(trained, mkw=mkw, rank=cfg.model.lora_rank,
                                                       alpha=cfg.model.lora_alpha).items()}
    assert st.rebase(trained, 2, adapters=fresh) == 1
    restored = AggregatorState.restore(**state_kwargs(cfg, str(tmp_path / "ck")))
    actor = start_actor(restored, name="fedge-aggregator-resume-test")
    loop = ServerLoop(None, cfg, actor=actor, clock=clk.VirtualClock(), run_dir=tmp_path, eval_data={},
                      model=global_model(cfg), num_partitions=1)
    assert loop.base_model == "base-000002" and loop.version == 1  # published: devices fetch it by name
    assert (tmp_path / "models" / "base-000002" / "manifest.json").is_file()
    assert (tmp_path / "bases" / "base-000002.safetensors").is_file()  # for `fedge evaluate RUN_DIR`
    got = base_state(loop.model)
    assert all(torch.equal(got[k], torch.from_numpy(trained[k])) for k in trained)
    import ray

    ray.kill(actor)


def test_a_reply_whose_objects_never_arrive_is_given_up_after_the_bound():
    """A SuperNode killed mid-upload: Flower would retry the reply's objects for 2 h; bounded, it gives up."""
    import time

    from flwr.supercore.inflatable import inflatable_utils as iu

    from fedge.cloud.flower_patch import bound_reply_pulls

    saved = dict(iu.pull_objects.__kwdefaults__)
    try:
        assert bound_reply_pulls(1.5)

        def never(object_id: str) -> bytes:
            raise iu.ObjectUnavailableError(object_id)

        t0 = time.monotonic()
        with pytest.raises(iu.ObjectPullError):
            iu.pull_objects(["lost-object"], never)
        assert time.monotonic() - t0 < 15  # backoff 1 s, 2 s, ... : a few seconds, not PULL_MAX_TIME (7200 s)
    finally:
        iu.pull_objects.__kwdefaults__.clear()
        iu.pull_objects.__kwdefaults__.update(saved)
