"""The device agent (``fedge edge run``): keep ingesting into the SampleStore and keep a Flower SuperNode running.

Two supervised child processes, each in its own process group:

* **ingest** — ``fedge edge ingest`` from the device's camera / microphone sources into the store; restarted
  with backoff when it fails, and when a live source (camera index, device, URL) ends; a recorded file that
  has been read to its end is done, and one whose ingest fails :data:`INGEST_GIVE_UP` times in a row with the
  same exit code and error line is given up, with a log line that says so (a restarted ingest resumes where
  the last one stopped, :mod:`fedge.edge.resume`, so a restart only repeats what failed);
* **supernode** — ``flower-supernode`` with this package's ClientApp against the SuperLink; node config
  ``device-id``, ``store``, ``modalities``, ``profile``, ``threads`` (see :mod:`fedge.edge.node_config`). The SuperNode
  itself retries a lost connection (unlimited by default); should it exit anyway, the agent restarts it with
  exponential backoff (a SuperLink that is down for an hour is retried for an hour).

TLS when ``--root-certificates`` is given (else ``--insecure``), SuperNode authentication when ``--auth-keys``
names the node's key (the directory ``fedge cloud certs`` writes per node, holding ``auth.key``, or the key
file itself). SIGTERM / SIGINT stop both children gracefully (SIGTERM to their groups, SIGKILL after a
grace period). Nothing is lost by stopping: samples are committed to SQLite one by one by the ingest, and the
ClientApp writes adapters, error-feedback residual and privacy ledger atomically to ``<store>/agent-state``
after every update (:mod:`fedge.edge.node_state`), so a restarted agent carries on where it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedge.common.config import MODALITIES
from fedge.common.pki_files import NODE_PRIVATE_KEY
from fedge.common.procs import escalate

from .node_config import NodeConfig

__all__ = [
    "AUTH_KEY_NAMES",
    "INGEST_GIVE_UP",
    "Agent",
    "AgentError",
    "Child",
    "auth_key_path",
    "build_agent",
    "child_env",
    "ingest_command",
    "parse_address",
    "supernode_command",
]

INGEST_GIVE_UP = 3  # a recording whose ingest fails this many times in a row alike is given up
AUTH_KEY_NAMES = (NODE_PRIVATE_KEY,)  # what `fedge cloud certs` writes per node (OpenSSH ECDSA private key)


class AgentError(ValueError):
    """A bad agent argument (missing file, malformed address); the message names it."""


def _log(msg: str) -> None:
    print(f"[fedge-agent] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the agent dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); AgentError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"--superlink {address!r}: expected HOST:PORT")
    return host, int(port)


def auth_key_path(auth_keys: Path) -> Path:
    """The SuperNode's private key: ``auth_keys`` itself if a file, else the one key file inside the directory."""
    if auth_keys.is_file():
        return auth_keys
    if not auth_keys.is_dir():
        raise AgentError(f"--auth-keys {auth_keys}: no such file or directory")
    for name in AUTH_KEY_NAMES:
        if (auth_keys / name).is_file():
            return auth_keys / name
    raise AgentError(f"--auth-keys {auth_keys}: holds no {' or '.join(AUTH_KEY_NAMES)}")


def supernode_command(*, superlink: str, node: NodeConfig, port: int, root_certificates: Path | None = None,
                      auth_key: Path | None = None, bin_dir: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this device."""
    parse_address(superlink)
    exe = str((bin_dir or Path(sys.executable).parent) / "flower-supernode")
    cmd = [exe, "--superlink", superlink, "--node-config", node.to_flower(), "--port", str(port)]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def ingest_command(*, store: Path, video: str | None, audio: str | None, extra: Sequence[str] = ()) -> list[str]:
    """The ``fedge edge ingest`` command line for this device's sources."""
    cmd = [sys.executable, "-m", "fedge.common.cli", "edge", "ingest", "--store", str(store)]
    if video:
        cmd += ["--video", video]
    if audio:
        cmd += ["--audio", audio]
    return cmd + list(extra)


@dataclass
class Child:
    """A supervised child process: restarted with exponential backoff per its policy."""

    name: str
    argv: list[str]
    env: dict[str, str]
    restart: str = "always"  # "always" | "on-failure"
    min_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0  # running this long resets the backoff
    give_up_after: int = 0  # stop restarting after this many failures in a row that end alike (0: never)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    done: bool = False
    _backoff: float = field(default=0.0, repr=False)
    _next_start: float = field(default=0.0, repr=False)
    _started_at: float = field(default=0.0, repr=False)
    _failure: tuple[int, str] | None = field(default=None, repr=False)  # (exit code, last error line)
    _same_failures: int = field(default=0, repr=False)
    _last_error: list[str] = field(default_factory=lambda: [""], repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        # preexec_fn: the agent forks from its only thread (signals just set an Event)
        watch = self.give_up_after > 0  # its stderr passes through the agent, which keeps the last error line
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                     stderr=subprocess.PIPE if watch else None,
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509
        if watch:
            self._last_error = [""]
            self._reader = threading.Thread(target=_forward_stderr, args=(self.proc, self._last_error), daemon=True)
            self._reader.start()
        self.starts += 1
        self._started_at = time.monotonic()
        _log(f"{self.name} started (pid {self.proc.pid}, start #{self.starts})")

    def poll(self, now: float) -> None:
        """Start, or restart after an exit, as the policy and backoff say."""
        if self.done:
            return
        if self.proc is None:
            if now >= self._next_start:
                self.start()
            return
        rc = self.proc.poll()
        if rc is None:
            return
        ran = now - self._started_at
        self.proc = None
        if rc == 0 and self.restart == "on-failure":
            _log(f"{self.name} finished")
            self.done = True
            return
        if self.give_up_after > 0 and rc != 0:
            if self._reader is not None:
                self._reader.join(timeout=5.0)  # the error line the child wrote just before it exited
            failure = (rc, self._last_error[0])
            self._same_failures = self._same_failures + 1 if failure == self._failure else 1
            self._failure = failure
            if self._same_failures >= self.give_up_after:
                _log(f"{self.name}: giving up after {self._same_failures} failures in a row that ended alike "
                     f"(exit {rc}: {failure[1] or 'no error line'}); fix the source and restart the agent")
                self.done = True
                return
        self._backoff = self.min_backoff_s if ran >= self.stable_s or not self._backoff else \
            min(self.max_backoff_s, 2 * self._backoff)
        self._next_start = now + self._backoff
        _log(f"{self.name} exited with {rc} after {ran:.1f}s; restarting in {self._backoff:.0f}s")

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace_s``; return the exit code."""
        self.done = True
        p = self.proc
        if p is None:
            return None
        escalate(p, ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)), send=lambda sig: os.killpg(p.pid, sig),
                 on_ignored=lambda sig: _log(f"{self.name} (pid {p.pid}) ignored {sig.name}"))
        try:  # stragglers of the group (e.g. a ClientApp process mid-round)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return p.returncode


def _forward_stderr(proc: subprocess.Popen[bytes], last_error: list[str]) -> None:
    """Copy a child's stderr to the agent's, keeping its last ``error:`` line in ``last_error[0]``."""
    assert proc.stderr is not None
    for line in proc.stderr:
        text = line.decode(errors="replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        text = text.strip()
        if text.startswith("error:"):
            last_error[0] = text
    proc.stderr.close()


class Agent:
    """Supervises the ingest and SuperNode children until :meth:`stop` (or SIGTERM / SIGINT)."""

    def __init__(self, children: Sequence[Child], *, grace_s: float = 20.0) -> None:
        self.children = list(children)
        self.grace_s = grace_s
        self._stop = threading.Event()

    def stop(self, *_: object) -> None:
        """Ask the supervision loop to end (safe from a signal handler)."""
        self._stop.set()

    def run(self, *, poll_s: float = 0.5, install_signals: bool = True,
            on_tick: Callable[[Agent], None] | None = None) -> int:
        """Supervise until stopped; return 0."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for c in self.children:
                    c.poll(now)
                if on_tick is not None:
                    on_tick(self)
                self._stop.wait(poll_s)
        finally:
            _log("stopping")
            # the SuperNode first: no new round starts while the ingest finishes its current sample
            for c in sorted(self.children, key=lambda c: c.name != "supernode"):
                rc = c.stop(self.grace_s)
                if rc is not None:
                    _log(f"{c.name} stopped ({rc})")
        _log("stopped")
        return 0


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: this interpreter's bin dir first on PATH (Flower spawns its helpers by name)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def build_agent(*, superlink: str, store: Path, video: str | None = None, audio: str | None = None,
                root_certificates: Path | None = None, auth_keys: Path | None = None, device_id: str = "",
                modalities: Sequence[str] | None = None, profile: str = "auto", threads: int = 1,
                port: int = 9094, ingest_args: Sequence[str] = (), grace_s: float = 20.0, shards_url: str = "",
                shards_public_key: Path | None = None, shards_ca: Path | None = None,
                shards_cache: Path | None = None) -> Agent:
    """Validate the arguments and assemble the supervised children; raises AgentError naming a bad one."""
    parse_address(superlink)
    if root_certificates is not None and not root_certificates.is_file():
        raise AgentError(f"--root-certificates {root_certificates}: no such file")
    key = auth_key_path(auth_keys) if auth_keys is not None else None
    if auth_keys is not None and root_certificates is None:
        raise AgentError("--auth-keys needs --root-certificates: node authentication runs over TLS only")
    if modalities is None:  # what the sources can give; with no source, what the store holds
        modalities = tuple(m for m, src in zip(MODALITIES, (video, audio)) if src) or MODALITIES
    store = store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    for what, p in (("--shards-public-key", shards_public_key), ("--shards-ca", shards_ca)):
        if p is not None and not p.is_file():
            raise AgentError(f"{what} {p}: no such file")
    node = NodeConfig(device_id=device_id or store.name, store=str(store), modalities=tuple(modalities),
                      profile=profile, threads=threads, shards_url=shards_url,
                      shards_public_key=str(shards_public_key.resolve()) if shards_public_key else "",
                      shards_ca=str(shards_ca.resolve()) if shards_ca else "",
                      shards_cache=str(shards_cache.resolve()) if shards_cache else "")
    env = child_env()
    children = [Child("supernode", supernode_command(superlink=superlink, node=node, port=port,
                                                     root_certificates=root_certificates, auth_key=key), env)]
    if video or audio:
        # recordings (files, image folders) end and are done; a live source (camera index, device, URL,
        # microphone, FIFO) is reopened when it ends
        from fedge.edge.images import is_image_source

        files = ((not video or Path(video).is_file() or is_image_source(video))
                 and (not audio or Path(audio).is_file()))
        children.insert(0, Child("ingest", ingest_command(store=store, video=video, audio=audio,
                                                          extra=ingest_args), env,
                                 restart="on-failure" if files else "always",
                                 give_up_after=INGEST_GIVE_UP if files else 0))
    return Agent(children, grace_s=grace_s)

