"""A scenario also runs under `flwr run .`: `fedge simulate prepare` renders + ingests and writes the run config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flwr_link import BIN, simulation_superlink

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"


@pytest.mark.integration
def test_prepared_scenario_runs_with_flwr_run(tmp_path):
    run_dir = tmp_path / "run"
    with simulation_superlink(tmp_path, FEDGE_SIM_CACHE=str(tmp_path / "data")) as env:
        r = subprocess.run([sys.executable, "-m", "fedge.common.cli", "simulate", "prepare", str(TINY), "--out",
                            str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                           check=False)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "flwr run ." in r.stdout and (run_dir / "config.toml").is_file()
        r = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local-sim", "--stream", "--run-config", str(run_dir / "config.toml"),
             "--federation-config", "num-supernodes=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3]  # trained from the ingested stores, evaluated on held-out
