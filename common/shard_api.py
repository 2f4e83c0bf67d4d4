"""The shard server's HTTP contract: routes, headers, content types and the model store's file names.

``fedge.cloud.serving`` serves these routes and ``fedge.edge.shards`` requests them; both take every name from here, so
the two sides cannot drift apart.
"""

from __future__ import annotations

import urllib.parse

LATEST = "latest"  # the version alias that follows publications

# Routes, as FastAPI path templates; devices build concrete paths with the helpers below.
MODELS_ROUTE = "/v1/models"
MANIFEST_ROUTE = MODELS_ROUTE + "/{version}/manifest"
SHARD_ROUTE = MODELS_ROUTE + "/{version}/shards/{file}"
PREDICT_ROUTE = "/v1/predict"

# Headers. HTTP header names are case-insensitive: urllib sends ``X-fedge-device``, Starlette looks up any case.
AUTH_HEADER = "Authorization"
AUTH_SCHEME = "Bearer"
DEVICE_HEADER = "X-Fedge-Device"
VERSION_HEADER = "X-Fedge-Version"  # the concrete version a response belongs to (``latest`` resolved)
MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Ray Serve's model-multiplexing header
CREDENTIAL_HEADERS: tuple[str, ...] = (AUTH_HEADER, DEVICE_HEADER)  # dropped when a redirect leaves the origin

MANIFEST_CONTENT_TYPE = "application/json"
SHARD_CONTENT_TYPE = "application/octet-stream"

# The model store's layout: <root>/INDEX_FILE, <root>/<version>/MANIFEST_FILE next to the shard files.
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"

_BEARER_PREFIX = AUTH_SCHEME + " "


def manifest_path(version: str) -> str:
    """URL path of the signed manifest of ``version`` (``latest`` allowed)."""
    return MANIFEST_ROUTE.format(version=urllib.parse.quote(version))


def shard_path(version: str, file: str) -> str:
    """URL path of shard file ``file`` (e.g. ``router.onnx``) of ``version``."""
    return SHARD_ROUTE.format(version=urllib.parse.quote(version), file=urllib.parse.quote(file))


def bearer(token: str) -> str:
    """The ``Authorization`` value that carries a device token."""
    return _BEARER_PREFIX + token


def bearer_token(value: str) -> str | None:
    """The token of an ``Authorization`` value; None when it is not a bearer credential."""
    return value[len(_BEARER_PREFIX):] if value.startswith(_BEARER_PREFIX) else None


def sha256_etag(sha256: str) -> str:
    """The ETag of a manifest or shard: its quoted sha256 (a device sends a shard's as ``If-Range`` to resume)."""
    return f'"{sha256}"'


__all__ = [
    "AUTH_HEADER",
    "AUTH_SCHEME",
    "CREDENTIAL_HEADERS",
    "DEVICE_HEADER",
    "INDEX_FILE",
    "LATEST",
    "MANIFEST_CONTENT_TYPE",
    "MANIFEST_FILE",
    "MANIFEST_ROUTE",
    "MODELS_ROUTE",
    "MULTIPLEX_HEADER",
    "PREDICT_ROUTE",
    "SHARD_CONTENT_TYPE",
    "SHARD_ROUTE",
    "VERSION_HEADER",
    "bearer",
    "bearer_token",
    "manifest_path",
    "sha256_etag",
    "shard_path",
]
