"""The quickstart main job: a short federated training through Flower's simulation engine on embedded Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_quickstart_simulation_learns_and_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "common.cli", "simulate", "run", "--nodes", "4", "--out", str(out),
         "--set", "aggregation.versions=4", "--set", "aggregation.concurrency=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == [1, 2, 3, 4]
    assert lines[-1]["accuracy"] > lines[0]["accuracy"]
    assert lines[-1]["accuracy"] > 0.5
    assert (out / "config.toml").exists()
    assert "version   4" in r.stdout


def test_fedge_help_lists_groups():
    r = subprocess.run([sys.executable, "-m", "common.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for g in ("edge", "cloud", "simulate"):
        assert g in r.stdout


def test_bad_config_key_fails_with_key_named(tmp_path):
    r = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "run", "--set", "aggregation.bogus=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "aggregation.bogus" in r.stderr
