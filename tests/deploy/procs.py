"""Start and stop real processes in tests: each in its own session, logs to a file, stopped by its group id."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: fedge, flwr, flower-superlink, flower-superexec


def env_with(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the guide assumes: the venv's bin first on PATH (Flower spawns flower-superexec by name)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Proc:
    """A started command whose whole process group is stopped by :meth:`stop` (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path = ROOT) -> None:
        self.cmd = list(cmd)
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115  (closed in stop())
        self.p = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        """Everything the process logged so far."""
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group (this process and the children it spawned), SIGKILL what is left."""
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # children that ignored SIGTERM
        except ProcessLookupError:
            pass
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()
        return self.p.returncode


def wait_for(cond: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = (),
             every: float = 0.5) -> None:
    """Poll ``cond`` until true; on timeout fail with ``what`` and the tail of each process log."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(every)
    tails = "\n".join(f"--- {' '.join(p.cmd[:3])} (pid {p.pid}) ---\n{p.text()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def flwr_config(home: Path, name: str, address: str, ca_cert: Path | None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (TLS when a CA is given)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines += [f'root-certificates = "{ca_cert}"'] if ca_cert else ["insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")
