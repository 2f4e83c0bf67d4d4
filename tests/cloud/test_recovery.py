"""kill -9 the cloud side mid-run (launcher, SuperLink, ServerApp), restart it: it resumes from its checkpoint.

Real processes on loopback: `fedge cloud start` (embedded Ray + flower-superlink + flwr run) and two
flower-supernode processes running fedge.edge.client_app:app.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.cloud.launcher import wait_port
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETS = ["data.source=\"synthetic\"", "aggregation.mode=\"async\"", "aggregation.versions=4",
        "aggregation.buffer_size=1", "aggregation.concurrency=2", "aggregation.reply_timeout_s=60.0",
        "fault_tolerance.checkpoint_every=1", "train.local_steps=3", "data.samples_per_device=60",
        "data.eval_samples=100"]


def _events(run_dir):
    p = run_dir / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _versions(run_dir):
    p = run_dir / "metrics.jsonl"
    return [json.loads(x)["version"] for x in p.read_text().splitlines()] if p.is_file() else []


def _alive(pid):
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _serverapps(port):
    """PIDs of the flwr-serverapp and flower-superexec processes serving the SuperLink on ``port``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if ("flwr-serverapp" in cmd or "flower-superexec" in cmd) and f"127.0.0.1:{port} " in cmd + " ":
                out.append(int(d.name))
    return out


def _cloud(run_dir, port, env):
    cmd = [sys.executable, "-m", "fedge.common.cli", "cloud", "start", "--run-dir", str(run_dir), "--port", str(port),
           "--num-cpus", "1"]
    for s in SETS:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(run_dir.parent / f"cloud-{time.time():.0f}.log", "ab"),
                            stderr=subprocess.STDOUT)


@pytest.mark.integration
def test_kill_9_server_mid_run_then_restart_resumes_from_checkpoint(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    run_dir.mkdir()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    cloud, nodes = _cloud(run_dir, port, env), []
    try:
        wait_port("127.0.0.1", port, 120.0)  # nodes after the SuperLink: no reconnect back-off to sit out
        nodes = [subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port",
             str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"],
            cwd=ROOT, env=env, start_new_session=True, stdout=open(tmp_path / f"node{i}.log", "ab"),
            stderr=subprocess.STDOUT) for i in range(2)]
        t0 = time.monotonic()
        while len(_versions(run_dir)) < 2:
            assert time.monotonic() - t0 < 240, "no versions before the kill"
            assert cloud.poll() is None, "cloud stopped early"
            time.sleep(0.5)
        pids = json.loads((run_dir / "cloud.pids.json").read_text())
        os.killpg(cloud.pid, signal.SIGKILL)  # launcher, its Ray and SuperLink at once: no goodbye
        cloud.wait(timeout=30)
        for p in _serverapps(port):  # and the ServerApp (Flower starts it in a session of its own)
            os.kill(p, signal.SIGKILL)
        t_kill = time.monotonic()  # SIGKILL is delivered asynchronously: give the kernel a moment to end it
        while _alive(pids["superlink"]) and time.monotonic() - t_kill < 10:
            time.sleep(0.1)
        assert not _alive(pids["superlink"])
        ckpt = [e for e in _events(run_dir)]
        assert not any(e["event"] == "stopped" for e in ckpt)
        before = max(_versions(run_dir))

        t_restart = time.monotonic()
        cloud = _cloud(run_dir, port, env)
        assert cloud.wait(timeout=300) == 0
        resumed = [e for e in _events(run_dir) if e["event"] == "resumed"]
        assert len(resumed) == 1
        # checkpoint_every=1: every version up to the kill was checkpointed, so none is lost
        assert resumed[0]["version"] >= before >= 2
        assert resumed[0]["recovery_s"] < 60.0
        assert max(_versions(run_dir)) == 4 and _events(run_dir)[-1]["event"] == "stopped"
        print(f"recovered version {resumed[0]['version']} in {resumed[0]['recovery_s']:.2f}s "
              f"(restart to done {time.monotonic() - t_restart:.0f}s)")
    finally:
        for p in [cloud, *nodes]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        for pid in _serverapps(port):
            os.kill(pid, signal.SIGKILL)


def test_launcher_builds_superlink_and_federation_for_tls_and_insecure(tmp_path):
    from fedge.cloud.launcher import LaunchOptions, federation_toml, superlink_command

    o = LaunchOptions(run_dir=tmp_path, port=9555)
    cmd = superlink_command(o)
    assert "--insecure" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--port") + 1] == "9555" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert 'insecure = true' in federation_toml(o)
    files = []
    for n in ("ca.crt", "s.crt", "s.key", "n.pub"):
        (tmp_path / n).write_text("x")
        files.append(tmp_path / n)
    o = LaunchOptions(run_dir=tmp_path, ssl_ca_certfile=files[0], ssl_certfile=files[1], ssl_keyfile=files[2],
                      auth_public_keys=[files[3]])
    cmd = superlink_command(o)
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    assert f'root-certificates = "{files[0]}"' in federation_toml(o)


@pytest.mark.parametrize("args, msg", [
    (["--ssl-certfile", "x.crt"], "TLS needs"),
    (["--auth-public-key", "n.pub"], "needs TLS"),
    (["--set", "aggregation.bogus=1"], "aggregation.bogus"),
])
def test_cloud_start_refuses_bad_options_with_one_line(tmp_path, args, msg):
    r = subprocess.run([sys.executable, "-m", "fedge.common.cli", "cloud", "start", "--run-dir", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stderr[-500:]
