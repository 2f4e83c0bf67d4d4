"""Shared fixtures: one embedded Ray per test session (started only by tests that ask for it)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# a ServerApp run without run_dir records itself under $FEDGE_RUNS_DIR: never the user's ~/.fedge in tests
os.environ.setdefault("FEDGE_RUNS_DIR", tempfile.mkdtemp(prefix="fedge-runs-"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray shared by the whole session: 2 CPUs, no dashboard, its own temp dir."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="fedge-ray-")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    ray.shutdown()


from tests.shard_server import modality_version, shard_server, shard_store  # noqa: F401
