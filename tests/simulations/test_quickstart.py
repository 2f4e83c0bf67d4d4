"""The main job end to end: `fedge simulate SCENARIO` renders device streams, ingests them into stores, trains
federated on Flower's simulation engine over an embedded Ray and writes the report (tiny scenario, subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"


def _simulate(*args, cache, timeout=300):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "common.cli", "simulate", *map(str, args), "--quiet"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_tiny_scenario_runs_end_to_end_and_the_same_seed_gives_the_same_result(tmp_path):
    cache = tmp_path / "data"
    r = _simulate(TINY, "--out", tmp_path / "a", cache=cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "a"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3]
    prepared = json.loads((run / "prepared.json").read_text())
    assert prepared["devices"] == 3 and prepared["eval_samples"] > 0  # the held-out set went through ingest
    for f in ("config.toml", "report.md", "accuracy_vs_time.png", "accuracy_vs_bytes.png"):
        assert (run / f).is_file(), f
    assert any((run / "tb").iterdir())
    assert f"report: {run}" in r.stdout.replace("\n", " ") or "report.md" in r.stdout
    stores = sorted(p.name for p in (cache.iterdir().__next__() / "stores").iterdir())
    assert stores == ["device-0", "device-1", "device-2"]

    r2 = _simulate(TINY, "--out", tmp_path / "b", cache=cache)  # data from the cache, training again
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    recs2 = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    key = ("version", "accuracy", "loss", "updates", "upload_bytes")
    assert [[x.get(k) for k in key] for x in recs2] == [[x.get(k) for k in key] for x in recs]


def test_fedge_help_lists_groups():
    r = subprocess.run([sys.executable, "-m", "common.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
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
