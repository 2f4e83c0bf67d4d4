"""The 10,000-device scenario's path at 200 devices: `fedge simulate` deals a shared pool out by partition and runs
the real apps on Flower's simulation engine (subprocess), and the report says where the data came from."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "simulations" / "scenarios" / "tenthousand.toml"
SMALL = ["simulation.devices=200", "simulation.pool_samples=100", "simulation.pretrain_steps=0",
         "simulation.frame_size=32", "data.eval_samples=20", "aggregation.versions=2", "aggregation.buffer_size=5",
         "aggregation.concurrency=20"]


@pytest.mark.integration
def test_two_hundred_devices_draw_from_a_shared_pool_through_the_real_simulation(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fedge.common.cli", "simulate", "run", str(SCENARIO), "--out", str(tmp_path / "run"),
           "--quiet", *[x for s in SMALL for x in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2] and all(x["updates"] > 0 for x in recs)
    prepared = json.loads((run / "prepared.json").read_text())
    assert prepared["devices"] == 200 and prepared["source"] == "shared pool"
    assert prepared["pool"]["samples"] > 50 and prepared["pool"]["reuse"] > 1  # 1,000 draws from ~100 samples
    assert "shared pool" in (run / "report.md").read_text()
    (data_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("avdigits-")]
    assert not (data_dir / "stores").exists()  # nothing rendered per device
    cfg = (run / "config.toml").read_text()
    assert 'source = "pool"' in cfg
