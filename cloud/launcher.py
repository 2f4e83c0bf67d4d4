"""What ``fedge cloud start`` runs (:mod:`fedge.cloud.cli.launch`): embedded (or joined) Ray + a Flower SuperLink +
the fedge run, shut down cleanly.

Steps: resolve the config into ``run_dir/config.toml``; start Ray in this process (or note ``--ray-address``)
and export its address as ``$FEDGE_RAY_ADDRESS`` so the ServerApp process joins it (cloud/state.py); start
``flower-superlink`` on 127.0.0.1 with an explicit port (its default 8000 clashes with Ray Serve), TLS and
SuperNode authentication when certificates and keys are given, ``--disable-runtime-dependency-installation``
(else it ``uv sync``s a CUDA torch) and a SQLite database in the run dir; write a federation into a
``FLWR_HOME`` it manages; submit the app with ``flwr run --stream`` and wait for the run to end.
Ctrl-C (or SIGTERM) first sends SIGTERM to the run's ServerApp (Flower starts it in a session of its own and
the SuperLink leaves it running), which checkpoints and exits; then ``flwr run`` and the SuperLink get SIGINT
(then SIGTERM, SIGKILL), and Ray stops. Restarting with the same ``--run-dir`` resumes from the checkpoint.
``--dashboard [HOST:]PORT`` has the ServerApp serve its live dashboard (:mod:`fedge.cloud.dashboard`; the token reaches
it through the environment, never the saved config); ``--ray-dashboard`` starts the embedded Ray's own dashboard.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedge.common.config import FedgeConfig
from fedge.common.procs import escalate

from .state import RAY_ADDRESS_ENV, RAY_ADDRESS_FILE

__all__ = [
    "APP_DIR",
    "FEDERATION",
    "PIDS_FILE",
    "LaunchOptions",
    "federation_toml",
    "serverapp_pids",
    "start",
    "superlink_command",
    "wait_port",
]

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml with [tool.flwr.app]
FEDERATION = "fedge"
PIDS_FILE = "cloud.pids.json"  # launcher and SuperLink pids (for operators and the kill -9 test)


@dataclass
class LaunchOptions:
    """What ``fedge cloud start`` was asked to do (flat, filled by the CLI)."""

    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    ray_address: str = ""
    num_cpus: int = 2
    ssl_ca_certfile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    auth_public_keys: list[Path] = field(default_factory=list)
    app_dir: Path = APP_DIR
    timeout_s: float = 0.0  # 0 = wait for the run however long it takes
    ray_dashboard: bool = False  # start Ray's own dashboard with the embedded Ray


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else (shutil.which(name) or name)


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (fail at once if ``proc`` exits meanwhile)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process meant to listen on {host}:{port} exited with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def superlink_command(o: LaunchOptions) -> list[str]:
    """The ``flower-superlink`` command line for these options."""
    cmd = [_bin("flower-superlink"), "--disable-runtime-dependency-installation", "--host", o.host,
           "--port", str(o.port), "--database", str(o.run_dir / "superlink.db")]
    tls = [o.ssl_ca_certfile, o.ssl_certfile, o.ssl_keyfile]
    if any(tls):
        if not all(tls):
            raise ValueError("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
        for p in tls:
            if not Path(p).is_file():  # type: ignore[arg-type]
                raise FileNotFoundError(f"certificate file not found: {p}")
        cmd += ["--ssl-ca-certfile", str(o.ssl_ca_certfile), "--ssl-certfile", str(o.ssl_certfile),
                "--ssl-keyfile", str(o.ssl_keyfile)]
    else:
        cmd.append("--insecure")
    if o.auth_public_keys:
        if not any(tls):
            raise ValueError("SuperNode authentication needs TLS (--ssl-* files)")
        cmd.append("--enable-supernode-auth")
    return cmd


def federation_toml(o: LaunchOptions) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink this launcher started."""
    lines = [f"[superlink.{FEDERATION}]", f'address = "{o.host}:{o.port}"']
    if o.ssl_ca_certfile:
        lines.append(f'root-certificates = "{o.ssl_ca_certfile}"')
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def start(cfg: FedgeConfig, o: LaunchOptions, *, echo=print) -> int:  # type: ignore[no-untyped-def]
    """Run the aggregator until its run ends or Ctrl-C; return the ``flwr run`` exit code (130 on Ctrl-C)."""
    o.run_dir = o.run_dir.resolve()
    o.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, run_dir=str(o.run_dir))
    cfg_path = cfg.save(o.run_dir)
    env = {**os.environ, "FEDGE_RUN_CONFIG": str(cfg_path), "RAY_USAGE_STATS_ENABLED": "0",
           # the SuperLink starts flower-superexec / flwr-serverapp by name: this environment's first
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    home = o.run_dir / ".flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(federation_toml(o))
    env["FLWR_HOME"] = str(home)

    import ray

    if o.ray_address:
        address = o.ray_address
        echo(f"[fedge] Ray: joining {address}")
    else:
        ctx = ray.init(num_cpus=o.num_cpus, include_dashboard=o.ray_dashboard, dashboard_host="127.0.0.1",
                       log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        echo(f"[fedge] Ray: embedded, {address}")
        if o.ray_dashboard and ctx.dashboard_url:
            echo(f"[fedge] Ray dashboard: http://{ctx.dashboard_url}")
    # The ServerApp process is started by Flower's SuperExec, which may outlive a killed launcher and keep
    # its environment: the run dir's file, rewritten on every start, is what the ServerApp trusts first.
    env[RAY_ADDRESS_ENV] = address
    (o.run_dir / RAY_ADDRESS_FILE).write_text(address + "\n")

    procs: list[subprocess.Popen[bytes]] = []
    interrupted = False

    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    prev = signal.signal(signal.SIGTERM, _on_term)
    code = 1
    try:
        if _port_busy(o.host, o.port):
            raise RuntimeError(f"{o.host}:{o.port} is already in use (another SuperLink?)")
        # same process group as this launcher: a Ctrl-C at the terminal (or a kill of the group) reaches it
        with open(o.run_dir / "superlink.log", "ab") as link_log:  # the child keeps its own descriptor
            link = subprocess.Popen(superlink_command(o), env=env, stdout=link_log, stderr=subprocess.STDOUT)
        procs.append(link)
        (o.run_dir / PIDS_FILE).write_text(json.dumps({"launcher": os.getpid(), "superlink": link.pid}))
        try:
            wait_port(o.host, o.port, 60.0, link)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"SuperLink did not start ({e}); see {o.run_dir / 'superlink.log'}") from None
        echo(f"[fedge] SuperLink on {o.host}:{o.port} ({'TLS' if o.ssl_certfile else 'insecure'}), "
             f"run dir {o.run_dir}")
        for key in o.auth_public_keys:
            r = subprocess.run([_bin("flwr"), "supernode", "register", str(key), FEDERATION], env=env,
                               capture_output=True, text=True, timeout=60, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"registering {key} failed: {(r.stdout + r.stderr)[-500:]}")
        run = subprocess.Popen([_bin("flwr"), "run", str(o.app_dir), FEDERATION, "--stream"], env=env,
                               cwd=o.app_dir)
        procs.append(run)
        code = run.wait(timeout=o.timeout_s or None)
    except KeyboardInterrupt:
        interrupted = True
        code = 130
        echo("[fedge] stopping: the ServerApp checkpoints, then SuperLink and Ray stop")
    finally:
        signal.signal(signal.SIGTERM, prev)
        if interrupted:  # the ServerApp first, while Ray still runs: it checkpoints on SIGTERM
            _stop_serverapps(o.host, o.port)
        _stop(procs, graceful=interrupted)
        if ray.is_initialized():
            ray.shutdown()
    return code


def serverapp_pids(host: str, port: int) -> list[int]:
    """PIDs of the ``flwr-serverapp`` processes attached to the SuperLink at ``host:port`` (Linux ``/proc``).

    Flower's SuperExec starts them in sessions of their own, and the SuperLink does not stop them when it
    stops, so the launcher finds them by their ``--runtime-api-address``.
    """
    out: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("flwr-serverapp") for a in text[:2]) and f"{host}:{port}" in text:
            out.append(int(d.name))
    return out


def _stop_serverapps(host: str, port: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the run's ServerApp processes and give them ``timeout_s`` to checkpoint and exit."""
    pids = serverapp_pids(host, port)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    while pids and time.monotonic() - t0 < timeout_s:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]], *, graceful: bool) -> None:
    """SIGINT each process (``flwr run``, then the SuperLink), then SIGTERM, then SIGKILL."""
    for p in reversed(procs):  # the SuperLink stops its SuperExec (the ServerApp was stopped before)
        escalate(p, ((signal.SIGINT, 20.0 if graceful else 5.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)))

