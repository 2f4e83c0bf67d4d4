"""The device agent: supervision of real child processes, argument checks, SIGTERM; real SuperLink runs below."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import ConfigError
from edge.agent import (
    AgentError,
    Child,
    auth_key_path,
    build_agent,
    child_env,
    parse_address,
    supernode_command,
)
from edge.node_config import NodeConfig
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_failing_child_is_restarted_with_growing_backoff(tmp_path):
    c = Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"], child_env(), min_backoff_s=0.2,
              max_backoff_s=0.4)
    t0 = time.monotonic()
    while c.starts < 3 and time.monotonic() - t0 < 20:
        c.poll(time.monotonic())
        time.sleep(0.05)
    assert c.starts == 3
    assert c._backoff == pytest.approx(0.4)  # 0.2, then doubled, capped
    c.stop(1.0)


def test_finished_on_failure_child_is_not_restarted_and_stop_ends_the_whole_group(tmp_path):
    done = Child("ingest", [sys.executable, "-c", "pass"], child_env(), restart="on-failure")
    done.poll(time.monotonic())
    _wait(lambda: done.proc.poll() is not None, 20, "the child to finish")
    done.poll(time.monotonic())
    assert done.done and done.starts == 1
    # a child that spawns a grandchild: stop() ends both (the group), by SIGTERM
    pidfile = tmp_path / "grandchild.pid"
    code = (f"import subprocess,sys,time; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);"
            f"open({str(pidfile)!r},'w').write(str(p.pid)); time.sleep(60)")
    c = Child("supernode", [sys.executable, "-c", code], child_env())
    c.poll(time.monotonic())
    _wait(lambda: pidfile.exists() and pidfile.read_text(), 20, "the grandchild")
    grandchild = int(pidfile.read_text())
    assert c.stop(5.0) == -signal.SIGTERM
    _wait(lambda: not _alive(grandchild), 10, "the grandchild to end")


def test_supernode_command_carries_tls_auth_and_node_config(tmp_path):
    node = NodeConfig(device_id="mic-1", store=str(tmp_path), modalities=("audio",))
    cmd = supernode_command(superlink="10.0.0.1:9092", node=node, port=9111)
    assert cmd[0].endswith("flower-supernode") and "--insecure" in cmd
    assert cmd[cmd.index("--node-config") + 1] == f'device-id="mic-1" store="{tmp_path}" modalities="audio" ' \
                                                  'profile="auto" threads=1'
    ca, key = tmp_path / "ca.crt", tmp_path / "auth.key"
    cmd = supernode_command(superlink="h:1", node=node, port=1, root_certificates=ca, auth_key=key)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key)


def test_bad_arguments_fail_with_one_line_naming_them(tmp_path):
    with pytest.raises(AgentError, match="--superlink 'nohost'"):
        parse_address("nohost")
    with pytest.raises(AgentError, match="--superlink"):
        parse_address("h:99999")
    with pytest.raises(AgentError, match="--root-certificates"):
        build_agent(superlink="h:1", store=tmp_path / "s", root_certificates=tmp_path / "none.pem")
    (tmp_path / "keys").mkdir()
    with pytest.raises(AgentError, match="holds no auth.key"):
        auth_key_path(tmp_path / "keys")
    (tmp_path / "keys" / "auth.key").write_text("k")
    assert auth_key_path(tmp_path / "keys") == tmp_path / "keys" / "auth.key"
    with pytest.raises(AgentError, match="needs --root-certificates"):
        build_agent(superlink="h:1", store=tmp_path / "s", auth_keys=tmp_path / "keys")
    with pytest.raises(ConfigError, match="'modalities'"):
        build_agent(superlink="h:1", store=tmp_path / "s", modalities=("smell",))
    r = subprocess.run([str(BIN / "fedge"), "edge", "run", "--superlink", "h:1", "--store", str(tmp_path / "s"),
                        "--profile", "tpu"], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    want = "fedge edge run: node config key 'profile': must be one of ('auto', 'cpu', 'gpu'), got 'tpu'"
    assert r.stderr.strip().splitlines() == [want]


def test_modalities_default_to_the_sources_given(tmp_path):
    a = build_agent(superlink="h:1", store=tmp_path / "s", audio="mic.wav")
    sn = next(c for c in a.children if c.name == "supernode")
    assert 'modalities="audio"' in sn.argv[sn.argv.index("--node-config") + 1]
    assert [c.name for c in a.children] == ["ingest", "supernode"]
    ing = a.children[0].argv
    assert ing[ing.index("--audio") + 1] == "mic.wav" and "--video" not in ing


def test_sigterm_stops_the_agent_and_its_supernode(tmp_path):
    """`fedge edge run` against a SuperLink that is not there: the SuperNode keeps retrying until SIGTERM."""
    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([str(BIN / "fedge"), "edge", "run", "--superlink", f"127.0.0.1:{free_port()}",
                              "--store", str(tmp_path / "store"), "--port", str(free_port()), "--grace", "10"],
                             stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env={**child_env(), "FLWR_HOME": str(tmp_path / "flwr")})
        try:
            _wait(lambda: "supernode started (pid" in log.read_text(), 60, "the SuperNode to start")
            sn_pid = int(log.read_text().split("supernode started (pid ")[1].split(",")[0])
            time.sleep(2.0)
            assert _alive(sn_pid), log.read_text()  # retrying, not crashed
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 0, log.read_text()
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert "supernode stopped" in text and "[fedge-agent] stopped" in text
    assert not _alive(sn_pid)
    assert (tmp_path / "store").is_dir()
