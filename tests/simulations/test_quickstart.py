"""The main job end to end: `fedge simulate SCENARIO` renders device streams, ingests them into stores, trains
federated on Flower's simulation engine over an embedded Ray and writes the report (tiny scenario, subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"


def _simulate(*args, cache, timeout=300):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "fedge.common.cli", "simulate", *map(str, args), "--quiet"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One prepared-data cache for the tiny scenario, shared by this module's runs."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.mark.integration
def test_tiny_scenario_runs_end_to_end_and_the_same_seed_gives_the_same_result(tmp_path, tiny_cache):
    cache = tiny_cache
    r = _simulate(TINY, "--out", tmp_path / "a", cache=cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "a"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3]
    assert all(x["virtual_time"] > 0 and x["bytes_sent"] > 0 for x in recs)
    prepared = json.loads((run / "prepared.json").read_text())
    assert prepared["devices"] == 3 and prepared["eval_samples"] > 0  # the held-out set went through ingest
    assert prepared["ingest"]["samples_stored"] > 0 and prepared["ingest"]["keyframes"] > 0
    for f in ("config.toml", "report.md", "accuracy_vs_time.png", "accuracy_vs_bytes.png", "staleness_hist.png",
              "per_modality.png", "global_adapters.npz"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    assert "report.md" in r.stdout
    (data_dir,) = list(cache.iterdir())
    assert sorted(p.name for p in (data_dir / "stores").iterdir()) == ["device-0", "device-1", "device-2"]
    assert prepared["cloud_samples"] > 0  # the cloud's curated share went through ingest too

    # the cloud pretrained the base; the resolved config points both apps at it; version 0 is above chance
    from fedge.cloud.builders import global_model, heldout_data
    from fedge.common.config import load_config as _load
    from fedge.common.lora import base_state
    from fedge.common.training import evaluate
    from fedge.edge.client_app import get_model

    cfg = _load(toml_path=run / "config.toml")
    assert Path(cfg.model.base_path).parent == data_dir and Path(cfg.model.base_path).is_file()
    server = global_model(cfg)
    sb, cb = base_state(server), base_state(get_model(cfg))
    assert all(np.array_equal(sb[k].numpy(), cb[k].cpu().numpy()) for k in sb)
    assert evaluate(server, heldout_data(cfg))["accuracy"] > 0.3  # 10 classes: chance is 0.1

    # simulation.time_budget_s stops the server once the virtual clock reaches it (same prepared data, reused)
    budget = recs[1]["virtual_time"]  # reached by version 2, long before 30 versions
    r = _simulate(TINY, "--out", tmp_path / "b", "--set", "aggregation.versions=30", "--set",
                  f"simulation.time_budget_s={budget}", cache=cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rb[-1]["virtual_time"] >= budget and all(x["virtual_time"] < budget for x in rb[:-1])
    assert len(rb) < 10

    # the same seed gives the same run: every version's accuracy, loss, virtual time, bytes and staleness
    # (Flower's engine gives the nodes new random ids each run; the server dispatches by partition id)
    r = _simulate(TINY, "--out", tmp_path / "c", cache=cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rc = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    keys = ("version", "accuracy", "loss", "virtual_time", "bytes_sent", "bytes_down", "staleness", "updates")
    assert [{k: x[k] for k in keys} for x in rc] == [{k: x[k] for k in keys} for x in recs]
    ga, gc = np.load(run / "global_adapters.npz"), np.load(tmp_path / "c" / "global_adapters.npz")
    assert ga.files == gc.files and all(np.array_equal(ga[k], gc[k]) for k in ga.files)

    # the same seed renders and ingests the very same samples (a second, independent preparation)
    from fedge.common.config import load_config
    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig
    from fedge.simulations.evaluation import load_arrays
    from fedge.simulations.prepare import prepare

    cfg_a = load_config(toml_path=run / "config.toml")
    cfg_b = prepare(load_config(toml_path=TINY), tmp_path / "data2", progress=False)
    ea, eb = load_arrays(cfg_a.data.eval_path), load_arrays(cfg_b.data.eval_path)
    # ... and the cloud pretrains the very same base from it
    assert Path(cfg_a.model.base_path).read_bytes() == Path(cfg_b.model.base_path).read_bytes()
    assert all(np.array_equal(ea[k], eb[k]) for k in ea)
    for i in range(3):
        da = local_data(cfg_a, NodeConfig(partition_id=i, num_partitions=3))
        db = local_data(cfg_b, NodeConfig(partition_id=i, num_partitions=3))
        diff = [k for k in da if da[k].shape != db[k].shape or not np.array_equal(da[k], db[k])]
        assert not diff, (i, diff, {k: (da[k].shape, db[k].shape) for k in diff})


@pytest.mark.integration
def test_global_training_every_n_versions_hands_devices_a_new_base(tmp_path, tiny_cache):
    """training.every_versions: Ray Train trains the merged model on the cloud share, the aggregator rebases,
    publishes it into the run's model store, devices fetch it by the version their messages name (as deltas
    against the start base) and their updates are accepted against it."""
    r = _simulate(TINY, "--out", tmp_path / "g", "--set", "training.every_versions=2", "--set",
                  "aggregation.versions=5", "--set", "training.steps=10", "--set", "training.workers=1",
                  "--set", "training.log_every=5", cache=tiny_cache, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "g"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    (gt,) = [e for e in events if e["event"] == "global_training"]
    assert gt["base_version"] == 2 and gt["version"] == 3 and gt["steps"] == 10
    assert gt["base"] == "base-000002" and (run / "models" / "base-000002" / "manifest.json").is_file()
    published = [e for e in events if e["event"] == "published"]
    assert [e["model"] for e in published] == ["base-000000", "base-000002"] and published[1]["deltas"] > 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3, 4, 5]
    assert recs[2]["updates"] == 0  # version 3 is the rebase: the trained base with fresh adapters
    assert recs[3]["updates"] + recs[4]["updates"] >= 2  # devices trained on the new base; accepted
    stopped = events[-1]
    assert stopped["event"] == "stopped" and stopped["base_version"] == 2
    # the cloud trained on its curated share (the prepared cloud.npz), not on generated data
    assert json.loads((run / "config.json").read_text())["training.data_path"].endswith("cloud.npz")


def test_fedge_help_lists_groups():
    r = subprocess.run([sys.executable, "-m", "fedge.common.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0
    for g in ("edge", "cloud", "simulate"):
        assert g in r.stdout


def test_bad_override_fails_with_key_named(tmp_path):
    r = _simulate(TINY, "--set", "aggregation.bogus=1", cache=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "aggregation.bogus" in r.stderr


@pytest.mark.parametrize("body,key", [
    ("[simulation]\ndevices = 0\n", "simulation.devices"),
    ("[data]\npartition = \"zipf\"\n", "data.partition"),
    ("[profiles]\nstraggler_fraction = 2.0\n", "profiles.straggler_fraction"),
    ("[simulaton]\ndevices = 4\n", "simulaton"),
])
def test_bad_scenario_file_fails_with_key_named(tmp_path, body, key):
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    r = _simulate(bad, cache=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert key in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.integration
def test_full_scope_federation_learns_from_a_random_base(tmp_path, tiny_cache):
    """train.scope = full: every parameter travels and trains, so a federation with no pretrained base learns."""
    r = _simulate(TINY, "--out", tmp_path / "f", "--set", "simulation.pretrain_steps=0", "--set", "train.scope=full",
                  "--set", "aggregation.versions=5", "--set", "train.local_steps=10", "--set", "train.lr=0.003",
                  cache=tiny_cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    acc = [x["accuracy"] for x in recs]
    assert acc[-1] >= 0.5 and acc[-1] >= acc[0] + 0.15, acc  # 10 classes: chance is 0.1
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["model.base_path"] == "" and cfg["train.scope"] == "full"
    final = np.load(tmp_path / "f" / "global_adapters.npz")
    assert "encoders.image.conv.0.weight" in final.files  # base weights are part of the global state


def test_sync_scenario_is_the_quickstart_under_synchronous_fedavg():
    """`fedge simulate compare quickstart.toml sync.toml` compares aggregation only: same data, base, model, training."""
    from fedge.common.config import load_config
    from fedge.simulations.prepare import data_key

    scen = ROOT / "simulations" / "scenarios"
    quick, sync = (load_config(toml_path=scen / f"{n}.toml") for n in ("quickstart", "sync"))
    assert data_key(quick) == data_key(sync)
    assert quick.train == sync.train and quick.model == sync.model and quick.profiles == sync.profiles
    assert (quick.aggregation.mode, sync.aggregation.mode) == ("async", "sync")
