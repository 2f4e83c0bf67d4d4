"""HTTP delivery of one shard to a device: the transport and credential checks, redirects that keep the token on
its origin, and a download that resumes with ``Range`` / ``If-Range``, retries through an outage, stops one byte
past the signed size and checks the sha256 before the file is kept.

Standard library only (``urllib``): an edge device installs without Ray or HTTP extras. Header names and the
ETag come from the contract in :mod:`fedge.common.shard_api`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedge.common.manifest import ShardFile
from fedge.common.shard_api import AUTH_HEADER, CREDENTIAL_HEADERS, DEVICE_HEADER, bearer, sha256_etag
from fedge.edge.shard_errors import (
    ShardAuthError,
    ShardDownloadError,
    ShardInsecureError,
    ShardIntegrityError,
    ShardTLSError,
    ShardUnavailableError,
)

__all__ = [
    "NET_ERRORS",
    "CacheStats",
    "CredentialSafeRedirect",
    "auth_headers",
    "check_transport",
    "download",
    "open_path",
    "sha256_file",
]

log = logging.getLogger("fedge.edge")

NET_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException,
              ssl.SSLError, OSError)


@dataclass
class CacheStats:
    """What the cache did: bytes over the network, requests, resumed downloads, cache hits."""

    downloaded_bytes: int = 0
    requests: int = 0
    resumed: int = 0
    hits: int = 0
    evicted: int = 0


def check_transport(url: str, token: str | None, allow_insecure_http: bool) -> None:
    """Refuse to send ``token`` in clear text to a plain ``http://`` url unless that was allowed."""
    if token and url.startswith("http://") and not allow_insecure_http:
        raise ShardInsecureError(
            f"refusing to send the device token in clear text to {url}: use an https:// shard server, "
            "or allow_insecure_http (--allow-insecure-http) on a network you trust")


def auth_headers(url: str, token: str | None, device: str | None, allow_insecure_http: bool) -> dict[str, str]:
    """The device's credential headers, after :func:`check_transport` (the url may have changed since)."""
    check_transport(url, token, allow_insecure_http)
    h: dict[str, str] = {}
    if token:
        h[AUTH_HEADER] = bearer(token)
    if device:
        h[DEVICE_HEADER] = device
    return h


def open_path(opener: urllib.request.OpenerDirector, url: str, path: str, headers: dict[str, str],
              timeout: float) -> http.client.HTTPResponse:
    """GET ``url + path``; a refusal, a missing file and an untrusted certificate raise their shard errors."""
    req = urllib.request.Request(url + path, headers=headers)
    try:
        return opener.open(req, timeout=timeout)  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        detail = _error_detail(e)
        if e.code in (401, 403):
            raise ShardAuthError(f"{path}: refused ({e.code}): {detail}") from None
        if e.code == 404:
            raise ShardUnavailableError(f"{path}: not on the server: {detail}") from None
        raise
    except urllib.error.URLError as e:
        # a certificate that does not verify is misconfiguration or an attack, never "offline"
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise ShardTLSError(f"{url}: TLS certificate not trusted ({e.reason.verify_message}); "
                                "pin the server's CA with ca_file") from None
        raise


def download(
    path: str,
    entry: ShardFile,
    part: Path,
    dest: Path,
    *,
    version: str,
    open_: Callable[[str, dict[str, str]], http.client.HTTPResponse],
    credentials: Callable[[], dict[str, str]],
    retries: int,
    retry_s: float,
    chunk_bytes: int,
    stats: CacheStats,
    progress: Callable[[str, int], None] | None = None,
) -> None:
    """Download ``entry`` of ``version`` from ``path`` into ``part`` (resuming), verify it, move it to ``dest``.

    ``open_(path, headers)`` sends one request; ``credentials()`` gives the headers of each attempt. A cut or
    refused attempt is retried (resuming) ``retries`` times, and beyond that while ``retry_s`` seconds allow
    (backoff up to 2 s). Raises :class:`ShardDownloadError` when bytes are left to resume,
    :class:`ShardUnavailableError` when nothing came, :class:`ShardIntegrityError` when the bytes are over the
    signed size or miss its sha256 (deleted).
    """
    last: Exception | None = None
    start, attempt = time.monotonic(), -1
    while True:
        attempt += 1
        have = part.stat().st_size if part.exists() else 0
        if have > entry.bytes:
            part.unlink()
            have = 0
        headers = credentials()
        if 0 < have < entry.bytes:
            headers |= {"Range": f"bytes={have}-", "If-Range": sha256_etag(entry.sha256)}
        try:
            if have == entry.bytes:
                break
            with open_(path, headers) as r:
                if r.status == 206:
                    if not _resumes_at(r.headers.get("Content-Range"), have):
                        part.unlink()  # the next attempt asks for the whole file
                        raise ShardDownloadError(f"{entry.file}: asked to resume at byte {have}, the server "
                                                 f"answered the range {r.headers.get('Content-Range')!r}")
                    stats.resumed += 1
                    mode = "ab"
                else:  # 200: the whole file (the server ignored or refused the range)
                    mode, have = "wb", 0
                length = r.headers.get("Content-Length")
                if length is not None and length.isdigit() and have + int(length) > entry.bytes:
                    part.unlink(missing_ok=True)
                    raise _oversize(entry, version, have + int(length))
                with open(part, mode) as fh:
                    # never more than one byte past the manifest's size, whatever the server streams
                    while block := r.read1(min(chunk_bytes, entry.bytes + 1 - have)):
                        fh.write(block)
                        stats.downloaded_bytes += len(block)
                        have += len(block)
                        if have > entry.bytes:
                            break
                        if progress:
                            progress(entry.name, len(block))
                if have > entry.bytes:
                    part.unlink()
                    raise _oversize(entry, version, have)
            if have < entry.bytes:
                raise ShardDownloadError(f"{entry.file}: connection closed after {have}/{entry.bytes} bytes")
            break
        except (ShardAuthError, ShardUnavailableError):
            raise
        except (ShardDownloadError, *NET_ERRORS) as e:
            last = e
            wait = min(0.2 * 2**attempt, 2.0)
            if attempt < retries or time.monotonic() - start + wait <= retry_s:
                held = part.stat().st_size if part.exists() else 0
                log.warning("%s: download cut at %d/%d bytes (%s: %s); retrying in %.1f s", entry.file, held,
                            entry.bytes, type(e).__name__, e, wait)
                time.sleep(wait)
                continue
        if part.exists() and part.stat().st_size > 0:
            raise ShardDownloadError(
                f"{entry.file}: download interrupted at {part.stat().st_size}/{entry.bytes} bytes "
                f"({type(last).__name__}: {last}); the next attempt resumes"
            ) from None
        raise ShardUnavailableError(f"{entry.file}: server unreachable and not cached ({last})") from None
    got = sha256_file(part)
    if got != entry.sha256:
        part.unlink()
        raise ShardIntegrityError(
            f"shard {entry.file} of version {version}: sha256 {got[:16]}... != manifest {entry.sha256[:16]}... "
            "(deleted, refused)"
        )
    os.replace(part, dest)


def _oversize(entry: ShardFile, version: str, got: int) -> ShardIntegrityError:
    return ShardIntegrityError(
        f"shard {entry.file} of version {version}: the server sent {'at least ' if got == entry.bytes + 1 else ''}"
        f"{got} bytes, over the manifest's {entry.bytes} (deleted, refused)")


def _resumes_at(content_range: str | None, have: int) -> bool:
    """Whether a 206's ``Content-Range`` continues exactly where the partial file ends (another span would
    corrupt it)."""
    return content_range is not None and content_range.strip().startswith(f"bytes {have}-")


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme.lower())


class CredentialSafeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send the device's credentials only to the origin they were given for.

    urllib copies every header to the redirected request, the token included; a shard server (or anything
    between) could otherwise send a device to another host and collect its token. A redirect from ``https`` to
    ``http`` is refused unless the cache allows plain HTTP.
    """

    def __init__(self, allow_insecure_http: Callable[[], bool]) -> None:
        self.allow_insecure_http = allow_insecure_http  # read per redirect: the setting may change after construction

    def redirect_request(self, req: urllib.request.Request, fp: object, code: int, msg: str,
                         headers: object, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]
        if new is None:
            return None
        old_scheme = _origin(req.full_url)[0]
        if old_scheme == "https" and _origin(newurl)[0] != "https" and not self.allow_insecure_http():
            raise ShardInsecureError(f"{req.full_url} redirected to plain {newurl}; refused")
        if _origin(newurl) != _origin(req.full_url):
            for h in CREDENTIAL_HEADERS:
                new.remove_header(h.capitalize())  # urllib stores header names capitalize()d
        return new


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(4096) or b"{}")
        return str(body.get("detail", body))
    except (ValueError, OSError):
        return e.reason if isinstance(e.reason, str) else str(e.reason)
