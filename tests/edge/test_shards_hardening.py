"""ShardCache against a hostile or broken server: rollback, redirects, plain HTTP, oversized and tampered shards.

The server here is a small stdlib HTTP server on 127.0.0.1 that serves genuinely signed manifests and lets a test
misbehave on purpose (serve another version, redirect elsewhere, stream too much); what the device does is the
real ShardCache over real sockets.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedge.common.manifest import Manifest, ShardFile, public_pem, sign_manifest
from fedge.common.shard_api import DEVICE_HEADER
from fedge.edge.shards import (
    ShardCache,
    ShardInsecureError,
    ShardIntegrityError,
    ShardVersionError,
)

KEY = Ed25519PrivateKey.generate()
TOKEN, DEVICE = "s3cret-token", "dev-7"
NAMES = ("encoder.audio", "router", "head", "expert.0")


def _version(version: str, serial: int, *, size: int = 3000) -> tuple[Manifest, dict[str, bytes]]:
    """A signed model version whose shards are random bytes (the cache only moves and hashes them)."""
    blobs = {f"{n}.onnx": hashlib.sha256(f"{version}/{n}".encode()).digest() * (size // 32) for n in NAMES}
    files = tuple(
        ShardFile(name=n, kind=n.split(".")[0], modality="audio" if n == "encoder.audio" else None,
                  format="onnx", file=f"{n}.onnx", sha256=hashlib.sha256(blobs[f"{n}.onnx"]).hexdigest(),
                  bytes=len(blobs[f"{n}.onnx"]), expert=0 if n == "expert.0" else None)
        for n in NAMES)
    manifest = Manifest(version=version, model={"num_experts": 1}, files=files,
                        created=f"2026-01-01T00:00:{serial:02d}+00:00", serial=serial)
    return manifest, blobs


@dataclass
class FakeServer:
    """Serves ``versions``; ``latest`` names the current one; ``answer`` overrides a version's manifest
    (a server that answers another version than asked); ``redirect`` sends shard requests elsewhere;
    ``stream_bytes`` streams that many bytes for every shard regardless of its size."""

    versions: dict[str, tuple[Manifest, dict[str, bytes]]] = field(default_factory=dict)
    latest: str = ""
    answer: dict[str, str] = field(default_factory=dict)
    redirect: str = ""
    stream_bytes: int = 0
    send_length: bool = True
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def add(self, version: str, serial: int, **kw: int) -> Manifest:
        self.versions[version] = _version(version, serial, **kw)
        self.latest = version
        return self.versions[version][0]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        self.seen.append((h.path, {k.lower(): v for k, v in h.headers.items()}))
        parts = h.path.split("/")  # '', 'v1', 'models', version, 'manifest' | 'shards', file
        version = self.latest if parts[3] == "latest" else parts[3]
        if parts[4] == "manifest":
            version = self.answer.get(version, version)
            return _reply(h, 200, sign_manifest(self.versions[version][0], KEY))
        if self.redirect:
            h.send_response(302)
            h.send_header("Location", self.redirect + h.path)
            h.send_header("Content-Length", "0")
            return h.end_headers()
        blob = self.versions[version][1][parts[5]]
        if not self.stream_bytes:
            return _reply(h, 200, blob)
        h.send_response(200)
        if self.send_length:
            h.send_header("Content-Length", str(self.stream_bytes))
        h.end_headers()
        try:
            for _ in range(0, self.stream_bytes, 1 << 16):
                h.wfile.write(b"x" * (1 << 16))
        except OSError:  # the device hung up, as it should
            pass


def _reply(h: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
    h.send_response(code)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def serve() -> Iterator:
    """Start FakeServers on 127.0.0.1 (free ports); all stopped after the test."""
    started: list[ThreadingHTTPServer] = []

    def start(tls: tuple[Path, Path] | None = None) -> FakeServer:
        fake = FakeServer()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # (certificate, key)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*map(str, tls))
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(httpd)
        fake.url = f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}"
        return fake

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def _cache(url: str, cache_dir: Path, **kw) -> ShardCache:
    opts = {"public_key": KEY.public_key(), "modalities": ("audio",), "token": TOKEN, "device": DEVICE,
            "allow_insecure_http": True, "retries": 0, "timeout": 5.0}
    return ShardCache(url, cache_dir, **(opts | kw))


# ---------------------------------------------------------------------- versions and rollback
def test_pinned_version_refuses_a_signed_manifest_of_another_version(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    srv.add("v2", 2)
    srv.answer["v2"] = "v1"  # asked for v2, answers the (genuinely signed) v1
    cache = _cache(srv.url, tmp_path, version="v2")
    with pytest.raises(ShardVersionError, match="asked for model version 'v2' but the signed manifest is 'v1'"):
        cache.manifest()
    assert not (tmp_path / "manifests" / "v1.json").exists() and cache.newest_seen() is None


def test_latest_rewound_to_an_older_signed_version_is_refused_across_restarts(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    srv.add("v2", 2)
    assert _cache(srv.url, tmp_path).manifest().version == "v2"
    srv.latest = "v1"  # the server (or someone between) rewinds latest
    restarted = _cache(srv.url, tmp_path)  # a new process: what it saw lives in the cache folder
    with pytest.raises(ShardVersionError, match="older than 'v2'.*rollback refused"):
        restarted.manifest()
    with pytest.raises(ShardVersionError, match="rollback refused"):
        _cache(srv.url, tmp_path, version="v1").manifest()  # nor by pinning it
    assert restarted.newest_seen() == ("v2", 2, srv.versions["v2"][0].created)
    assert (tmp_path / "manifests" / "LATEST").read_text() == "v2"  # the cache still points at v2


def test_newer_versions_are_accepted_and_remembered(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    cache = _cache(srv.url, tmp_path)
    assert cache.manifest().version == "v1"
    srv.add("v3", 3)
    assert cache.manifest(refresh=True).version == "v3"
    assert cache.manifest(refresh=True).version == "v3"  # the same version again is fine
    assert cache.newest_seen() is not None and cache.newest_seen()[:2] == ("v3", 3)


def test_unreadable_newest_record_is_a_clear_error_not_a_silent_reset(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    _cache(srv.url, tmp_path).manifest()
    (tmp_path / "manifests" / "newest.json").write_text("{not json")
    with pytest.raises(Exception, match="newest.json is unreadable.*delete it"):
        _cache(srv.url, tmp_path).manifest()


# ---------------------------------------------------------------------- credentials
def test_token_is_dropped_when_a_redirect_leaves_the_origin(serve, tmp_path):
    origin, elsewhere = serve(), serve()
    for srv in (origin, elsewhere):
        srv.add("v1", 1)
    origin.redirect = elsewhere.url  # another port: another origin
    cache = _cache(origin.url, tmp_path)
    path = cache.path("head")
    assert path.read_bytes() == origin.versions["v1"][1]["head.onnx"]  # the download itself still works
    (asked,) = [h for p, h in origin.seen if "/shards/" in p]
    (followed,) = [h for p, h in elsewhere.seen if "/shards/" in p]
    assert asked["authorization"] == f"Bearer {TOKEN}" and asked[DEVICE_HEADER.lower()] == DEVICE
    assert "authorization" not in followed and DEVICE_HEADER.lower() not in followed


def test_token_survives_a_redirect_within_the_origin(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    redirected = {"done": False}
    original = srv.handle

    def once(h):  # redirect the first shard request only, to the same scheme, host and port
        if "/shards/" in h.path:
            srv.redirect = "" if redirected["done"] else srv.url
            redirected["done"] = True
        return original(h)

    srv.handle = once
    cache = _cache(srv.url, tmp_path)
    cache.path("head")
    shard_requests = [h for p, h in srv.seen if "/shards/" in p]
    assert len(shard_requests) == 2 and all(h["authorization"] == f"Bearer {TOKEN}" for h in shard_requests)


def test_https_redirect_to_plain_http_is_refused(serve, tmp_path):
    from fedge.cloud.certs import generate

    layout = generate(tmp_path / "certs").layout
    secure, plain = serve((layout.server_cert, layout.server_key)), serve()
    for srv in (secure, plain):
        srv.add("v1", 1)
    secure.redirect = plain.url
    cache = _cache(secure.url, tmp_path / "c", ca_file=layout.ca_cert, allow_insecure_http=False)
    assert cache.manifest().version == "v1"  # over verified TLS
    with pytest.raises(ShardInsecureError, match="redirected to plain http://"):
        cache.path("head")
    assert [p for p, _ in plain.seen] == []  # nothing, token or not, went out in clear text


def test_token_over_plain_http_is_refused_unless_allowed(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    with pytest.raises(ShardInsecureError, match="clear text.*--allow-insecure-http"):
        _cache(srv.url, tmp_path, allow_insecure_http=False)
    assert srv.seen == []  # refused before anything was sent
    tokenless = _cache(srv.url, tmp_path / "a", token=None, allow_insecure_http=False)
    assert tokenless.manifest().version == "v1"  # no secret to leak: plain HTTP is the operator's choice
    cache = _cache(srv.url, tmp_path / "b")  # allowed explicitly
    cache.path("head")
    cache.url = srv.url.replace("127.0.0.1", "localhost")
    cache.allow_insecure_http = False  # a url or setting changed later is checked again per request
    with pytest.raises(ShardInsecureError):
        cache.path("router")


@pytest.mark.integration  # imports the whole inference stack (onnxruntime, OpenCV) on first use
def test_predict_cli_refuses_a_token_over_plain_http_in_one_line(serve, tmp_path):
    from fedge.edge.cli import app

    srv = serve()
    srv.add("v1", 1)
    key = tmp_path / "manifest.pub"
    key.write_bytes(public_pem(KEY.public_key()))
    args = ["predict", "--shards", srv.url, "--audio", str(tmp_path / "none.npy"), "--public-key", str(key),
            "--cache-dir", str(tmp_path / "c"), "--token", TOKEN, "--device", DEVICE]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "clear text" in lines[0] and "--allow-insecure-http" in lines[0]
    assert srv.seen == []
    r = CliRunner().invoke(app, [*args, "--allow-insecure-http"])  # now it gets as far as the missing audio
    assert "clear text" not in r.output and any("/manifest" in p for p, _ in srv.seen)


# ---------------------------------------------------------------------- sizes and the cache
@pytest.mark.parametrize("send_length", [True, False], ids=["declared", "undeclared"])
def test_download_stops_at_the_manifest_size(serve, tmp_path, send_length):
    srv = serve()
    srv.add("v1", 1)
    srv.stream_bytes, srv.send_length = 5 << 20, send_length  # 5 MiB for a 3 KB shard
    cache = _cache(srv.url, tmp_path, chunk_bytes=1024)
    size = cache.manifest().file("head").bytes
    with pytest.raises(ShardIntegrityError, match=f"over the manifest's {size}.*deleted"):
        cache.path("head")
    # refused before reading when the server declares the length, one byte past the size when it does not
    assert cache.stats.downloaded_bytes == (0 if send_length else size + 1)
    assert list((tmp_path / "partial").iterdir()) == [] and cache.cached_files() == []


def test_tampered_cache_hit_is_detected_and_fetched_again_in_the_same_process(serve, tmp_path):
    srv = serve()
    srv.add("v1", 1)
    cache = _cache(srv.url, tmp_path)
    path = cache.path("head")
    genuine = path.read_bytes()
    path.write_bytes(genuine[:-4] + b"evil")  # same size, changed after it was verified
    again = cache.path("head")
    assert again.read_bytes() == genuine
    assert cache.stats.downloaded_bytes == 2 * len(genuine) and cache.stats.hits == 0
    assert cache.path("head").read_bytes() == genuine and cache.stats.hits == 1
