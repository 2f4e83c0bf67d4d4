"""A scenario also runs under `flwr run .`: `fedge simulate prepare` renders + ingests and writes the run config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"


@pytest.mark.integration
def test_prepared_scenario_runs_with_flwr_run(tmp_path):
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.local-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(tmp_path / "data")}
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "prepare", str(TINY), "--out", str(run_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "flwr run ." in r.stdout and (run_dir / "config.toml").is_file()
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        time.sleep(5)
        r = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local-sim", "--stream", "--run-config", str(run_dir / "config.toml"),
             "--federation-config", "num-supernodes=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3]  # trained from the ingested stores, evaluated on held-out
