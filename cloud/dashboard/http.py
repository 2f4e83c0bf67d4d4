"""The dashboard's HTTP server: the page, ``/api/state``, ``/api/events`` (server-sent events) and ``/metrics``.

A stdlib ``ThreadingHTTPServer`` in a daemon thread of the aggregator process; each page holds one SSE stream
(one thread that sleeps on the live state's condition and sends a snapshot at most every ``min_interval_s``),
so watchers cost the loop nothing while it is quiet and never cause a polling storm.

Access: on loopback anyone on the machine may look. A token is needed whenever one is configured, and bound
beyond loopback one must be (``$FEDGE_DASHBOARD_TOKEN`` or any token in the shard server's tokens file,
``{device: sha256(token)}``) unless the operator says ``public``. The token comes as ``Authorization: Bearer``
(with ``X-Fedge-Device`` for a tokens-file token), or once as ``?token=`` (``&device=``) on the page's URL,
which sets an HttpOnly cookie for the page's own requests.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fedge.common.shard_api import AUTH_HEADER, DEVICE_HEADER, bearer_token

from .live import LiveState

__all__ = [
    "DEFAULT_PORT",
    "STATIC",
    "TOKEN_ENV",
    "Access",
    "DashboardError",
    "DashboardServer",
    "check_exposure",
    "is_loopback",
    "parse_address",
    "preflight",
    "start_dashboard",
]

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_ENV = "FEDGE_DASHBOARD_TOKEN"
DEFAULT_PORT = 8470
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml"}
_COOKIE_TOKEN, _COOKIE_DEVICE = "fedge_token", "fedge_device"


class DashboardError(ValueError):
    """The dashboard cannot start as asked (address, exposure without a token); the message says why."""


def parse_address(address: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); a bare port means 127.0.0.1."""
    host, sep, port = address.strip().rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DashboardError(f"dashboard address must be [HOST:]PORT, got {address!r}")
    host = host.strip("[]") if sep else "127.0.0.1"
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()  # as fedge.cloud.serving.token_digest stores it


class Access:
    """Who may read the dashboard: a token (plain, from the environment) and/or a tokens file of digests."""

    def __init__(self, *, token: str = "", tokens_file: str | Path | None = None) -> None:
        self.token = token
        self.tokens_file = Path(tokens_file) if tokens_file else None
        if self.tokens_file is not None and not self.tokens_file.is_file():
            raise DashboardError(f"dashboard tokens file not found: {self.tokens_file}")

    @property
    def required(self) -> bool:
        return bool(self.token) or self.tokens_file is not None

    def allows(self, token: str | None, device: str | None) -> bool:
        if not self.required:
            return True
        if not token:
            return False
        if self.token and hmac.compare_digest(self.token.encode(), token.encode()):
            return True
        if self.tokens_file is not None and device:
            try:
                want = json.loads(self.tokens_file.read_text()).get(device)
            except (OSError, ValueError):
                return False
            return isinstance(want, str) and hmac.compare_digest(want, _sha(token))
        return False


def check_exposure(host: str, access: Access, *, public: bool) -> None:
    """Refuse to serve beyond loopback without a token unless ``public`` (raises :class:`DashboardError`)."""
    if not is_loopback(host) and not access.required and not public:
        raise DashboardError(
            f"the dashboard on {host} is reachable from other machines: set ${TOKEN_ENV} (or "
            f"--dashboard-token), name the shard server's tokens file, or say --public")


def preflight(address: str, *, public: bool, token: str | None = None, tokens_file: str | Path | None = None) -> str:
    """Check before a run starts that its dashboard can serve ``address``; return ``http://HOST:PORT/``.

    Raises :class:`DashboardError` (one line) for a bad address, a missing tokens file, exposure beyond
    loopback without a token and without ``public``, or a port that cannot be bound.
    """
    host, port = parse_address(address)
    access = Access(token=os.environ.get(TOKEN_ENV, "") if token is None else token, tokens_file=tokens_file)
    check_exposure(host, access, public=public)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise DashboardError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}") from None
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the aggregator's output is for the federation, not for page loads

    # ------------------------------------------------------------------ access
    def _credentials(self, query: dict[str, list[str]]) -> tuple[str | None, str | None, bool]:
        """(token, device, from_query): header first, then the query, then the page's cookie."""
        token = bearer_token(self.headers.get(AUTH_HEADER, ""))
        if token is not None:
            return token.strip(), self.headers.get(DEVICE_HEADER), False
        if "token" in query:
            device = query["device"][0] if query.get("device") else None
            return query["token"][0], device, True
        jar = SimpleCookie(self.headers.get("Cookie", ""))
        tok, dev = jar.get(_COOKIE_TOKEN), jar.get(_COOKIE_DEVICE)
        unq = urllib.parse.unquote  # set quoted (see _send)
        return (unq(tok.value) if tok else None), (unq(dev.value) if dev else None), False

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        token, device, from_query = self._credentials(query)
        if not self.server.access.allows(token, device):
            self._send(HTTPStatus.UNAUTHORIZED, b"a dashboard token is required (Authorization: Bearer, or "
                       b"?token= on the page URL)\n", "text/plain; charset=utf-8",
                       extra={"WWW-Authenticate": 'Bearer realm="fedge"'})
            return
        cookies: dict[str, str] = {}
        if from_query and self.server.access.required and token:
            cookies = {_COOKIE_TOKEN: token, **({_COOKIE_DEVICE: device} if device else {})}
        path = url.path
        if path in ("/", "/index.html"):
            self._static("index.html", cookies)
        elif path.startswith("/static/"):
            self._static(path[len("/static/"):], cookies)
        elif path == "/api/state":
            body = json.dumps(self.server.live.snapshot()).encode()
            self._send(HTTPStatus.OK, body, "application/json", cookies=cookies)
        elif path == "/api/schema":
            self._static("state.schema.json", cookies)
        elif path == "/api/events":
            self._events()
        elif path == "/metrics":
            from ..prometheus import CONTENT_TYPE, exposition

            self._send(HTTPStatus.OK, exposition(self.server.registry), CONTENT_TYPE)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    # ------------------------------------------------------------------ responses
    def _static(self, name: str, cookies: dict[str, str]) -> None:
        path = (STATIC / name).resolve()
        if STATIC not in path.parents or not path.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            return
        self._send(HTTPStatus.OK, path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"),
                   cookies=cookies, extra={"Cache-Control": "no-cache"})

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, *, cookies: dict[str, str] | None = None,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        for k, v in (cookies or {}).items():
            self.send_header("Set-Cookie", f"{k}={urllib.parse.quote(v)}; Path=/; HttpOnly; SameSite=Strict")
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        """One server-sent-events stream: a ``state`` event now and after each change (rate-limited)."""
        live, stop = self.server.live, self.server.stopping
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        seen = -1
        with self.server.lock:
            self.server.streams += 1
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                snap = live.snapshot()
                seen = snap["seq"]
                body = json.dumps(snap).encode()
                # a big federation's state costs more to build: send it less often, so that one page never takes
                # more than ~5% of a core from the loop (which shares this process and its GIL)
                pause = max(self.server.min_interval_s, 20.0 * (time.perf_counter() - t0))
                self.wfile.write(b"event: state\ndata: " + body + b"\n\n")
                self.wfile.flush()
                if not snap["running"]:
                    self.wfile.write(b"event: end\ndata: {}\n\n")
                    self.wfile.flush()
                    return
                if stop.wait(pause):
                    return
                while live.wait(seen, 5.0) == seen and not stop.is_set():
                    self.wfile.write(b": keep-alive\n\n")  # also notices a page that went away
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with self.server.lock:
                self.server.streams -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], live: LiveState, access: Access, min_interval_s: float) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)
        from ..prometheus import registry_for

        self.live, self.access, self.min_interval_s = live, access, min_interval_s
        self.registry = registry_for(live)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.streams = 0  # open SSE streams


class DashboardServer:
    """A running dashboard; :attr:`url` is where to open it; :meth:`stop` closes it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]
        self.host, self.port = str(host), int(port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{self.port}/"

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; open streams first get up to ``grace_s`` to send the final state."""
        t0 = time.monotonic()
        while self._server.streams and time.monotonic() - t0 < grace_s:
            time.sleep(0.02)
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_dashboard(live: LiveState, address: str, *, public: bool = False, token: str | None = None,
                    tokens_file: str | Path | None = None, min_interval_s: float = 0.25) -> DashboardServer:
    """Serve ``live`` on ``address`` (``[HOST:]PORT``, port 0 = any free one) in a daemon thread.

    ``token`` defaults to ``$FEDGE_DASHBOARD_TOKEN``. Raises :class:`DashboardError` when bound beyond loopback
    without a token and not ``public``, or when the address cannot be bound.
    """
    host, port = parse_address(address)
    access = Access(token=os.environ.get(TOKEN_ENV, "") if token is None else token, tokens_file=tokens_file)
    check_exposure(host, access, public=public)
    try:
        server = _Server((host, port), live, access, min_interval_s)
    except OSError as e:
        raise DashboardError(f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}") from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                              name="fedge-dashboard")
    thread.start()
    return DashboardServer(server, thread)
