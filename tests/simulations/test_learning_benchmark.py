"""The speaker-split learning benchmark runs end to end (``benchmarks/learning.py --quick``: tiny sizes, subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("scratch_vs_central", "base_vs_central", "fused_clean", "image_only", "audio_only",
        "min_fused_minus_best_single", "missing30_drop_pts", "time_to_fedavg_final")


@pytest.mark.integration
@pytest.mark.xdist_group("benchmarks")  # with the other quick benchmarks, one at a time
@pytest.mark.timeout(900)
def test_quick_learning_benchmark_prints_every_row_and_the_metric_line(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/learning.py", "--quick", "--work", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=800, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1].split()
    assert [kv.split("=")[0] for kv in last] == list(KEYS)
    for kv in last:
        float(kv.split("=")[1])  # a number (inf and nan parse too)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {"centralized", "cloud-base", "flower-fedavg", "fedge-sync", "fedge-async-scratch", "fedge-async-base"}
    assert set(results["scores"]) == rows
    for row in rows:
        assert set(results["scores"][row]) == {"clean", "20dB", "5dB", "other-lang", "missing30"}
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
    assert "| fedge-async-base | other-lang |" in (tmp_path / "table.md").read_text()
