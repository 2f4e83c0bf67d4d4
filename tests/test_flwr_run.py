"""`flwr run .` works offline as docs/configuration.md documents: its block, run verbatim, starts its own
SuperLink in simulation mode, waits for it, points a FLWR_HOME federation at it and runs the app."""

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def documented_flwr_run_block() -> str:
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("## Running with `flwr run`"):]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.integration
def test_documented_flwr_run_block_runs_verbatim_with_the_config_defaults(tmp_path):
    """pyproject's defaults are the config's (async), and the run, given no run_dir, records itself under
    $FEDGE_RUNS_DIR/run-<id>."""
    before = (ROOT / "pyproject.toml").read_text()
    runs = tmp_path / "runs"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PORT": str(free_port()), "FEDGE_RUNS_DIR": str(runs),
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.Popen(["bash", "-e", "-c", documented_flwr_run_block()], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # whatever the block started and left behind
        except ProcessLookupError:
            pass
    assert p.returncode == 0, out[-3000:]
    assert "version   3" in out, out[-3000:]
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("run-") and f"run directory: {run_dir}" in out
    assert tomllib.loads((run_dir / "config.toml").read_text())["aggregation"]["mode"] == "async"
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in recs] == [1, 2, 3]
    assert (ROOT / "pyproject.toml").read_text() == before, "flwr run must not rewrite pyproject.toml"
