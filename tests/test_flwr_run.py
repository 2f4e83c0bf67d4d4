"""`flwr run .` works offline as the README documents: own SuperLink in simulation mode, FLWR_HOME federation."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.integration
def test_flwr_run_against_own_simulation_superlink(tmp_path):
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.local-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    before = (ROOT / "pyproject.toml").read_text()
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        time.sleep(5)
        r = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local-sim", "--stream", "--federation-config", "num-supernodes=3",
             "--run-config", "aggregation.versions=2 aggregation.concurrency=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert "version   2" in out, out[-3000:]
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
    assert (ROOT / "pyproject.toml").read_text() == before, "flwr run must not rewrite pyproject.toml"
