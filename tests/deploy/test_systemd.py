"""deploy/systemd + deploy/install-edge.sh: the unit passes `systemd-analyze verify`, its ExecStart is a valid
`fedge edge run`, and the install script, staged into a folder, writes what the unit reads."""

from __future__ import annotations

import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fedge.cloud.certs import generate

from .commands import check_argv
from .procs import BIN, ROOT

UNIT = ROOT / "deploy" / "systemd" / "fedge-edge.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "edge.env.example"
INSTALL = ROOT / "deploy" / "install-edge.sh"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows a key more than once)."""
    out: dict[str, dict[str, list[str]]] = {}
    sec = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            sec = out.setdefault(line.strip("[]"), {})
            continue
        k, _, v = line.partition("=")
        assert sec is not None
        sec.setdefault(k, []).append(v)
    return out


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _exec_start(unit: dict, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd expands it: ${X} is one word, $X is split on whitespace."""
    words = []
    for w in shlex.split(unit["Service"]["ExecStart"][0]):
        m = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", w)
        if m and m[1]:
            words.append(env[m[1]])
        elif m:
            words += env[m[2]].split()
        else:
            words.append(w)
    return words


def test_systemd_analyze_verifies_the_unit(tmp_path):
    # verify resolves ExecStart's binary and EnvironmentFile: point them at this machine's venv
    text = UNIT.read_text().replace("/opt/fedge/venv/bin/fedge", str(BIN / "fedge"))
    text = text.replace("EnvironmentFile=/etc/fedge/edge.env", f"EnvironmentFile={ENV_EXAMPLE}")
    unit = tmp_path / "fedge-edge.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       check=False)
    mine = [line for line in (r.stdout + r.stderr).splitlines() if "fedge-edge.service" in line]
    assert r.returncode == 0 and not mine, r.stdout + r.stderr


def test_unit_restarts_limits_resources_runs_unprivileged_and_keeps_the_store():
    u = _unit(UNIT.read_text())
    s = u["Service"]
    assert s["User"] == ["fedge"] and s["Group"] == ["fedge"] and s["NoNewPrivileges"] == ["yes"]
    assert s["Restart"] == ["always"] and float(s["RestartSec"][0]) > 0
    for key in ("CPUQuota", "MemoryMax", "MemoryHigh", "TasksMax", "LimitNOFILE"):
        assert key in s, key
    assert s["StateDirectory"] == ["fedge"] and s["ProtectSystem"] == ["strict"]
    argv = _exec_start(u, _env(ENV_EXAMPLE.read_text()))
    i = argv.index("--store")
    assert argv[i + 1].startswith("/var/lib/fedge/")  # = StateDirectory: persistent, writable under strict
    # SIGTERM to the agent only, and enough time for its own graceful stop of ingest and SuperNode
    assert s["KillMode"] == ["mixed"]
    assert int(s["TimeoutStopSec"][0]) > float(argv[argv.index("--grace") + 1])
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


def test_exec_start_is_a_valid_fedge_edge_run_with_tls_and_node_auth():
    argv = _exec_start(_unit(UNIT.read_text()), _env(ENV_EXAMPLE.read_text()))
    assert argv[:3] == ["/opt/fedge/venv/bin/fedge", "edge", "run"]
    assert check_argv(argv) == "fedge"
    assert argv[argv.index("--root-certificates") + 1] == "/etc/fedge/ca.crt"
    assert argv[argv.index("--auth-keys") + 1] == "/etc/fedge/auth"


@pytest.fixture()
def certs(tmp_path):
    return generate(tmp_path / "certs", nodes=["edge-0"]).layout


def _install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, check=False)


def test_install_script_stages_key_certificate_settings_and_unit(tmp_path, certs):
    root = tmp_path / "root"
    r = _install("--superlink", "cloud.example.org:9093", "--device-id", "edge-0", "--certs", str(certs.root),
                 "--audio", "/var/lib/fedge/inbox/mic.wav", "--extra-args", "--modalities audio",
                 "--root", str(root), "--skip-venv", "--prefix", "/srv/fedge")
    assert r.returncode == 0, r.stderr
    key = root / "etc/fedge/auth/auth.key"
    assert key.read_bytes() == certs.node_private_key("edge-0").read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "etc/fedge/auth").stat().st_mode) == 0o700
    assert (root / "etc/fedge/ca.crt").read_bytes() == certs.ca_cert.read_bytes()
    assert not (root / "etc/fedge/ca.key").exists()  # the CA key never leaves the cloud
    env = _env((root / "etc/fedge/edge.env").read_text())
    assert env == {"FEDGE_SUPERLINK": "cloud.example.org:9093", "FEDGE_DEVICE_ID": "edge-0",
                   "FEDGE_SOURCES": "--audio /var/lib/fedge/inbox/mic.wav", "FEDGE_EXTRA_ARGS": "--modalities audio"}
    unit_text = (root / "etc/systemd/system/fedge-edge.service").read_text()
    assert unit_text == UNIT.read_text().replace("/opt/fedge/venv", "/srv/fedge/venv")
    argv = _exec_start(_unit(unit_text), env)
    assert check_argv(argv) == "fedge"  # the staged unit + written settings make a valid command
    # re-running keeps the settings unless --force
    again = _install("--superlink", "other:1", "--device-id", "edge-0", "--certs", str(certs.root), "--audio", "x",
                     "--root", str(root), "--skip-venv")
    assert again.returncode == 0 and "keeping existing" in again.stdout
    assert _env((root / "etc/fedge/edge.env").read_text())["FEDGE_SUPERLINK"] == "cloud.example.org:9093"


@pytest.mark.parametrize("args, message", [
    ([], "--superlink HOST:PORT is required"),
    (["--superlink", "nohostport"], "--superlink 'nohostport' is not HOST:PORT"),
    (["--superlink", "h:1", "--device-id", "a/b"], "--device-id 'a/b'"),
    (["--superlink", "h:1", "--device-id", "edge-9", "--certs", "CERTS"], "no auth key for 'edge-9'"),
    (["--superlink", "h:1", "--device-id", "edge-0", "--certs", "CERTS"], "give at least one source"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_install_script_refuses_bad_input_in_one_line(tmp_path, certs, args, message):
    args = [str(certs.root) if a == "CERTS" else a for a in args]
    r = _install(*args, "--root", str(tmp_path / "r"), "--skip-venv")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_install_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(INSTALL)], check=False, timeout=30).returncode == 0
    assert shutil.which("systemd-analyze")
    assert Path(INSTALL).stat().st_mode & stat.S_IXUSR
