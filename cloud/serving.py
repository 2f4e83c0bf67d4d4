"""ShardServer: the Ray Serve application that delivers model versions to devices.

Routes (JSON unless noted)::

    GET  /v1/models                          {"versions": [...], "latest": "..."}
    GET  /v1/models/{version}/manifest       the signed manifest envelope (``version`` may be ``latest``)
    GET  /v1/models/{version}/shards/{file}  shard bytes; ETag = "<sha256>", Range / If-Range for resuming
    POST /v1/predict                         thin clients: {"image"?, "audio"?, "quality"?, "version"?}

``/v1/predict`` is multiplexed by model version (``@serve.multiplexed``; the version comes from the
``serve_multiplexed_model_id`` header, the body, or ``latest``), so replicas keep a few versions loaded and
Serve routes a request to a replica that already holds its version.

The deployment is thin: it reads a :class:`fedge.cloud.model_store.ModelStore` (published versions are immutable
and ``latest`` moves atomically), so publishing needs no redeploy and requests in flight during a swap all
succeed. With a tokens file, shard downloads and predictions need ``Authorization: Bearer <token>`` and
``X-Fedge-Device: <id>``; the file maps device id -> sha256(token) and is re-read when it changes. TLS is
Serve's own: ``http_options`` ``ssl_certfile`` / ``ssl_keyfile`` (uvicorn under Serve's proxy, Ray >= 2.5x).
Routes, header names and content types are the contract in :mod:`fedge.common.shard_api`, which devices share.

No ``from __future__ import annotations`` here: Serve's ingress rebuilds the route signatures, and string
annotations would turn ``request: Request`` into a query parameter.
"""

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request, Response
from ray import serve

from fedge.common.fsio import atomic_write
from fedge.common.shard_api import (
    AUTH_HEADER,
    AUTH_SCHEME,
    DEVICE_HEADER,
    LATEST,
    MANIFEST_CONTENT_TYPE,
    MANIFEST_ROUTE,
    MODELS_ROUTE,
    MULTIPLEX_HEADER,  # noqa: F401  (clients of the Serve app import it from here)
    PREDICT_ROUTE,
    SHARD_CONTENT_TYPE,
    SHARD_ROUTE,
    VERSION_HEADER,
    bearer_token,
    sha256_etag,
)

from .export import build_from_manifest
from .model_store import ModelStore, StoreError

__all__ = [
    "APP_NAME",
    "DEPLOYMENT",
    "ShardServer",
    "add_device_token",
    "api",
    "build_app",
    "check_exposure",
    "parse_range",
    "start_shard_server",
    "stop_shard_server",
    "token_digest",
]

APP_NAME = "shards"
DEPLOYMENT = "ShardServer"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

api = FastAPI(title="fedge shard server")


def token_digest(token: str) -> str:
    """What a tokens file stores for a device: the hex sha256 of its token (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``Range: bytes=a-b`` header into an inclusive (start, end) within ``size`` bytes.

    Returns None when the range cannot be satisfied (the caller answers 416); raises ValueError on syntax
    errors or multi-range requests (answered 400).
    """
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise ValueError(f"unsupported Range header {header!r} (one 'bytes=a-b' range only)")
    a, b = m.group(1), m.group(2)
    if a == "":  # suffix: last b bytes
        n = int(b)
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(a)
    end = size - 1 if b == "" else min(int(b), size - 1)
    if start >= size or end < start:
        return None
    return start, end


def _predict_inputs(body: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """Validate a predict body into model inputs (400 with a one-line reason on bad input)."""
    out: dict[str, torch.Tensor | None] = {"image": None, "audio": None, "quality": None}
    ndims = {"image": 4, "audio": 3, "quality": 2}
    for k in out:
        if body.get(k) is None:
            continue
        try:
            arr = np.asarray(body[k], dtype=np.float32)
        except (TypeError, ValueError):
            raise HTTPException(400, f"'{k}' must be a numeric array") from None
        if arr.ndim != ndims[k] or arr.shape[0] == 0:
            raise HTTPException(400, f"'{k}' must have {ndims[k]} dimensions with a batch axis, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise HTTPException(400, f"'{k}' has non-finite values")
        out[k] = torch.from_numpy(arr)
    if out["image"] is None and out["audio"] is None:
        raise HTTPException(400, "predict needs 'image' and/or 'audio'")
    sizes = {t.shape[0] for k, t in out.items() if t is not None}
    if len(sizes) != 1:
        raise HTTPException(400, f"inputs disagree on the batch size: {sorted(sizes)}")
    return out


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ShardServer:
    """Serve the versions of one :class:`ModelStore`.

    Parameters
    ----------
    store : root directory of the model store.
    tokens_file : JSON ``{device_id: sha256(token)}``; when given, shards and predictions need a token.
    """

    def __init__(self, store: str, tokens_file: str | None = None) -> None:
        self.store = ModelStore(store)
        self.tokens_file = Path(tokens_file) if tokens_file else None
        self._tokens: dict[str, str] = {}
        self._tokens_mtime = -1.0
        torch.set_num_threads(1)

    # ------------------------------------------------------------------ auth
    def _check_token(self, request: Request) -> None:
        if self.tokens_file is None:
            return
        try:
            mtime = self.tokens_file.stat().st_mtime
        except FileNotFoundError:
            raise HTTPException(503, "tokens file is missing on the server") from None
        if mtime != self._tokens_mtime:
            self._tokens = {str(k): str(v) for k, v in json.loads(self.tokens_file.read_text()).items()}
            self._tokens_mtime = mtime
        token = bearer_token(request.headers.get(AUTH_HEADER, ""))
        device = request.headers.get(DEVICE_HEADER, "")
        if token is None or not device:
            raise HTTPException(401, f"a device token is required ({AUTH_HEADER}: {AUTH_SCHEME}, {DEVICE_HEADER})",
                                headers={"WWW-Authenticate": AUTH_SCHEME})
        want = self._tokens.get(device)
        if want is None or not hmac.compare_digest(want, token_digest(token)):
            raise HTTPException(403, f"invalid token for device {device!r}")

    def _resolve(self, version: str) -> str:
        try:
            return self.store.resolve(version)
        except StoreError as e:
            raise HTTPException(404, str(e)) from None

    # ------------------------------------------------------------------ routes
    @api.get(MODELS_ROUTE)
    def models(self) -> dict[str, Any]:
        """Published versions (oldest first) and the latest one."""
        idx = self.store.index()
        return {"versions": idx["versions"], "latest": idx["latest"]}

    @api.get(MANIFEST_ROUTE)
    def manifest(self, version: str) -> Response:
        """The signed manifest envelope of a version, byte for byte."""
        v = self._resolve(version)
        data = self.store.manifest_bytes(v)
        return Response(
            data,
            media_type=MANIFEST_CONTENT_TYPE,
            headers={"ETag": sha256_etag(hashlib.sha256(data).hexdigest()), VERSION_HEADER: v},
        )

    @api.get(SHARD_ROUTE)
    def shard(self, version: str, file: str, request: Request) -> Response:
        """Shard bytes with ETag = sha256; honours Range (single range), If-Range and If-None-Match."""
        self._check_token(request)
        v = self._resolve(version)
        try:
            path, sha, size = self.store.shard_path(v, file)
        except StoreError as e:
            raise HTTPException(404, str(e)) from None
        etag = sha256_etag(sha)
        headers = {"ETag": etag, "Accept-Ranges": "bytes", VERSION_HEADER: v,
                   "Cache-Control": "public, max-age=31536000, immutable"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng and (if_range is None or if_range == etag):
            try:
                span = parse_range(rng, size)
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
            if span is None:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            start, end = span
            with open(path, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start + 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return Response(body, status_code=206, media_type=SHARD_CONTENT_TYPE, headers=headers)
        return Response(path.read_bytes(), media_type=SHARD_CONTENT_TYPE, headers=headers)

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, version: str) -> torch.nn.Module:
        """Load a published version (from its safetensors shards, hashes checked) for ``/v1/predict``."""
        return build_from_manifest(self.store.version_dir(version), self.store.manifest(version))

    @api.post(PREDICT_ROUTE)
    async def predict(self, request: Request) -> dict[str, Any]:
        """Classify samples for a thin client that runs no model itself."""
        self._check_token(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "body must be a JSON object")
        wanted = serve.get_multiplexed_model_id() or str(body.get("version") or LATEST)
        v = self._resolve(wanted)
        model = await self.get_model(v)
        inputs = _predict_inputs(body)
        try:
            with torch.no_grad():
                out = model(**inputs)
        except (RuntimeError, ValueError) as e:
            raise HTTPException(400, f"inputs do not fit model {v}: {str(e).splitlines()[0]}") from None
        probs = out.logits.softmax(dim=-1)
        return {
            "version": v,
            "predictions": out.logits.argmax(dim=-1).tolist(),
            "probs": probs.tolist(),
            "fusion_weights": out.fusion_weights.tolist(),
        }


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for Serve's CLI (``serve run fedge.cloud.serving:build_app store=DIR``) and config files.

    ``args``: ``store`` (required), ``tokens_file``, ``num_replicas``.
    """
    if not args.get("store"):
        raise ValueError("ShardServer needs the 'store' argument (root directory of the model store)")
    store = str(Path(str(args["store"])).expanduser().resolve())
    tokens = args.get("tokens_file")
    tokens = str(Path(str(tokens)).expanduser().resolve()) if tokens else None
    replicas = int(args.get("num_replicas", 1))
    return ShardServer.options(num_replicas=replicas).bind(store, tokens)  # type: ignore[attr-defined]


def check_exposure(host: str, tokens_file: str | Path | None, *, public: bool) -> None:
    """Refuse to serve beyond loopback without device tokens unless ``public`` (ValueError, one line).

    Without tokens anyone who reaches the port downloads the model and uses ``/v1/predict``; that must be a
    decision (``--public``), never the result of a missing ``--tokens``.
    """
    from .dashboard.http import is_loopback

    if not is_loopback(host) and tokens_file is None and not public:
        raise ValueError(f"the shard server on {host} would be reachable from other machines without device "
                         "tokens: pass --tokens (fedge cloud token DEVICE), or --public to serve everyone")


def start_shard_server(
    store: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tokens_file: str | Path | None = None,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    num_replicas: int = 1,
    name: str = APP_NAME,
    route_prefix: str = "/",
    ready_timeout_s: float = 60.0,
    public: bool = False,
) -> str:
    """Start Serve's HTTP proxy (if it is not running yet), deploy the ShardServer, wait until it answers and
    return its base URL.

    Needs a running Ray (``ray.init`` or a cluster address). Serve has one HTTP proxy per cluster: when
    Serve is already running, its host, port and TLS settings stay as they are (a warning is logged).
    Beyond loopback it needs ``tokens_file`` unless ``public`` (:func:`check_exposure`).
    """
    check_exposure(host, tokens_file, public=public)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
    http: dict[str, Any] = {"host": host, "port": int(port)}
    if ssl_certfile is not None:
        for p in (ssl_certfile, ssl_keyfile):
            if not Path(str(p)).is_file():
                raise FileNotFoundError(f"TLS file not found: {p}")
        http["ssl_certfile"] = str(Path(str(ssl_certfile)).resolve())
        http["ssl_keyfile"] = str(Path(str(ssl_keyfile)).resolve())
    serve.start(http_options=http)
    app = build_app(
        {"store": str(store), "tokens_file": str(tokens_file) if tokens_file else None,
         "num_replicas": num_replicas}
    )
    serve.run(app, name=name, route_prefix=route_prefix)
    scheme = "https" if ssl_certfile else "http"
    prefix = "" if route_prefix == "/" else route_prefix
    url = f"{scheme}://{host}:{port}{prefix}"
    _wait_ready(url.replace("://0.0.0.0:", "://127.0.0.1:"), timeout=ready_timeout_s)
    return url


def _wait_ready(url: str, *, timeout: float) -> None:
    """Poll ``GET /v1/models`` until the proxy answers (it may lag ``serve.run`` by a moment)."""
    import ssl
    import time
    import urllib.request

    # a liveness probe of our own loopback proxy: the certificate is checked by clients, not here
    ctx = ssl._create_unverified_context() if url.startswith("https") else None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + MODELS_ROUTE, timeout=5, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"shard server at {url} did not answer within {timeout:.0f} s")
        time.sleep(0.3)


def stop_shard_server(name: str = APP_NAME) -> None:
    """Delete the ShardServer application (Serve itself keeps running)."""
    serve.delete(name)


def add_device_token(tokens_file: str | Path, device: str) -> str:
    """Create (or replace) a device's token in ``tokens_file`` and return the token (shown once)."""
    import secrets

    if not device or any(c.isspace() for c in device):
        raise ValueError(f"device id {device!r}: must be non-empty without spaces")
    p = Path(tokens_file)
    tokens = json.loads(p.read_text()) if p.exists() else {}
    token = secrets.token_urlsafe(32)
    tokens[device] = token_digest(token)
    atomic_write(p, json.dumps(tokens, indent=1, sort_keys=True), mode=0o600)
    return token
