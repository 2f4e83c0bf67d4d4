"""`flwr run .` as docs/configuration.md documents it: an own SuperLink in simulation mode and a FLWR_HOME
federation."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


@contextlib.contextmanager
def simulation_superlink(tmp_path: Path, **extra_env: str) -> Iterator[dict[str, str]]:
    """Start ``flower-superlink --simulation`` on 127.0.0.1 (a free port) and yield the environment in which
    ``flwr run . local-sim`` reaches it (FLWR_HOME under ``tmp_path``, plus ``extra_env``); stop it on exit."""
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.local-sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", **extra_env}
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        time.sleep(5)
        yield env
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        link.wait(timeout=30)
