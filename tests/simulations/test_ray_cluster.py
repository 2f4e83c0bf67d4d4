"""`fedge simulate run --ray-address`: the simulation on an existing multi-node Ray cluster (two `ray start` nodes
on loopback, started and stopped by the test), and the one-line refusals of an address that cannot be joined."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge.simulations import cluster
from tests.conftest import free_port
from tests.deploy.procs import BIN, Proc, env_with, wait_for

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"
READY = "block forever"  # `ray start --block` prints this once its node is up and registered


def _env() -> dict[str, str]:
    return {k: v for k, v in env_with().items() if k != "RAY_ADDRESS"}  # only the address the test names


def _ray_start(args: list[str], log: Path) -> Proc:
    """One `ray start --block` node; stopping its process group stops its raylet, workers (and GCS)."""
    return Proc([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--num-cpus", "1",
                 "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20),
                 "--dashboard-agent-listen-port", str(free_port()), *args], log, _env())


@pytest.fixture
def two_node_cluster() -> Iterator[str]:
    """A head (1 CPU) and a second node (1 CPU) on 127.0.0.1 in a temp dir of their own; yields the address.
    Stopped by process group, never `ray stop` (that stops every Ray on the machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="fedge-rc-"))  # short: Ray's socket paths have a length limit
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[Proc] = []
    try:
        nodes.append(_ray_start(["--head", "--port", str(port), "--include-dashboard", "false",
                                 "--ray-client-server-port", str(free_port()), "--temp-dir", str(tmp / "ray")],
                                tmp / "head.log"))
        wait_for(lambda: READY in nodes[0].text(), 120, "the Ray head", nodes)
        nodes.append(_ray_start(["--address", address], tmp / "node.log"))
        wait_for(lambda: READY in nodes[1].text(), 120, "the second Ray node", nodes)
        yield address
    finally:
        for proc in reversed(nodes):
            proc.stop(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


_PLACEMENT = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False)
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [{"cls": a["ActorClassName"], "node": a["Address"]["NodeID"]} for a in state.actors().values()]
print(json.dumps({"alive": alive, "actors": actors}))
"""


@pytest.mark.integration
def test_simulation_runs_on_a_two_node_ray_cluster_with_client_actors_on_both_nodes(two_node_cluster, tmp_path):
    address = two_node_cluster
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "fedge.common.cli", "simulate", "run", str(TINY), "--ray-address", address, "--out", str(out),
         "--quiet", "--set", "simulation.devices=2", "--set", "simulation.pretrain_steps=0",
         "--set", "aggregation.versions=2", "--set", "simulation.client_cpus=1"],
        cwd=ROOT, env={**_env(), "FEDGE_SIM_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
        timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 node(s), 2 CPUs" in r.stdout + r.stderr
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2]
    info = json.loads((out / cluster.CLUSTER_FILE).read_text())
    assert info["address"] == address and len(info["nodes"]) == 2

    p = subprocess.run([sys.executable, "-c", _PLACEMENT, address], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert sorted(seen["alive"]) == sorted(n["node_id"] for n in info["nodes"])  # both nodes still up
    client_nodes = {a["node"] for a in seen["actors"] if a["cls"] == "ClientAppActor"}
    assert client_nodes == set(seen["alive"])  # Flower's ClientApp actors ran on both nodes
    assert any(a["cls"] == "_ActorState" for a in seen["actors"])  # the aggregator actor ran on the cluster too


def test_an_address_that_refuses_connections_fails_in_one_line():
    port = free_port()  # nothing listens on it
    with pytest.raises(cluster.ClusterError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}") as e:
        cluster.connect(f"127.0.0.1:{port}", timeout_s=2.0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:", ":6379", "host:port"])
def test_an_address_that_is_not_host_port_or_auto_is_refused(address):
    with pytest.raises(cluster.ClusterError, match="expected HOST:PORT"):
        cluster.connect(address)


def test_a_ray_client_address_is_refused_with_the_reason():
    with pytest.raises(cluster.ClusterError, match="Ray Client addresses are not supported"):
        cluster.connect("ray://127.0.0.1:10001")


def test_cli_reports_an_unreachable_cluster_in_one_line_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from fedge.simulations.cli import app

    port = free_port()
    res = CliRunner().invoke(app, ["run", str(TINY), "--ray-address", f"127.0.0.1:{port}", "--out",
                                   str(tmp_path / "run"), "--quiet"], env={"FEDGE_SIM_CACHE": str(tmp_path / "c")})
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert lines == [f"fedge simulate: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"]
    assert not (tmp_path / "c").exists()  # refused before any data was prepared


def test_job_env_carries_the_apps_path_the_fedge_variables_and_the_driver_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDGE_RUN_CONFIG", "/x/config.toml")
    monkeypatch.chdir(tmp_path)
    env = cluster.job_env({"EXTRA": "1"})
    assert env["FEDGE_RUN_CONFIG"] == "/x/config.toml" and env["EXTRA"] == "1"
    assert env[cluster.DRIVER_DIR_ENV] == str(tmp_path)
    assert set(env["PYTHONPATH"].split(os.pathsep)) >= {p or str(tmp_path) for p in sys.path}


def test_workers_enter_the_driver_directory_only_when_this_node_has_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cluster.DRIVER_DIR_ENV, str(tmp_path / "absent"))
    cluster.enter_driver_dir()
    assert Path.cwd() == tmp_path
    (tmp_path / "d").mkdir()
    monkeypatch.setenv(cluster.DRIVER_DIR_ENV, str(tmp_path / "d"))
    cluster.enter_driver_dir()
    assert Path.cwd() == tmp_path / "d"
