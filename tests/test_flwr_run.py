"""`flwr run .` works offline as the README documents: own SuperLink in simulation mode, FLWR_HOME federation."""

import subprocess
from pathlib import Path

import pytest

from tests.flwr_link import BIN, simulation_superlink

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_flwr_run_against_own_simulation_superlink(tmp_path):
    before = (ROOT / "pyproject.toml").read_text()
    with simulation_superlink(tmp_path) as env:
        r = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "local-sim", "--stream", "--federation-config", "num-supernodes=3",
             "--run-config", "aggregation.versions=2 aggregation.concurrency=3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert "version   2" in out, out[-3000:]
    assert (ROOT / "pyproject.toml").read_text() == before, "flwr run must not rewrite pyproject.toml"
