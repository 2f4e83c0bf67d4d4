"""ShardCache: fetch only the model shards a device needs, verify them, keep them in an on-disk LRU.

A device with modalities ``{audio}`` downloads the audio encoder, the router and the head; an expert only when
its router first routes a token to it. With modality-affine experts (``model.expert_affinity = "modality"``)
the router can only reach the experts of the device's modalities' groups, so the other groups' experts are
never fetched (and :meth:`ShardCache.path` refuses an expert recorded for a modality the device lacks);
:meth:`ShardCache.ensure_experts` prefetches the device's groups. Every manifest is checked against the Ed25519 public key pinned in the
device's config before any hash in it is trusted; every shard against its manifest sha256 (a mismatch is
deleted and refused). Files are content-addressed (``shards/<sha256>.<ext>``), so a shard that did not change
between versions is never downloaded twice. The cache stays within a byte budget by evicting the least
recently used files that the current version does not need right now, works offline from what it holds, and
resumes an interrupted download with an HTTP ``Range`` request (``If-Range`` = the sha256 ETag).

Delivery is hardened against a hostile network or server: a manifest must be the version asked for and never
older (by its signed serial) than the newest this device has accepted, which is remembered in the cache folder
across restarts, so a replayed older signed version is refused; the device token never travels in clear text
(``http://`` with a token is refused unless ``allow_insecure_http``) and is dropped when a redirect leaves the
server's origin; a download stops one byte past its manifest size; a cached shard is hashed again each time it
is opened, so a file changed on disk is fetched again rather than trusted.

Network code uses only the standard library (``urllib``): an edge device installs without Ray or HTTP extras.
Routes and header names are the contract in :mod:`fedge.common.shard_api`, which the shard server shares.

The HTTP side (credentials, redirects, the resuming download) is :mod:`fedge.edge.shard_download`, the errors
:mod:`fedge.edge.shard_errors`; this module is the cache: manifests and their rollback guard, shards, the LRU.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.common.fsio import atomic_write
from fedge.common.manifest import (
    Manifest,
    ManifestError,
    ShardFile,
    base_shards,
    device_experts,
    expert_shard,
    load_public_key,
    release_order,
    verify_manifest,
)
from fedge.common.shard_api import LATEST, manifest_path, shard_path
from fedge.edge.shard_download import (
    NET_ERRORS,
    CacheStats,
    CredentialSafeRedirect,
    auth_headers,
    check_transport,
    download,
    open_path,
    sha256_file,
)
from fedge.edge.shard_errors import (
    CacheBudgetError,
    ShardAuthError,
    ShardDownloadError,
    ShardError,
    ShardInsecureError,
    ShardIntegrityError,
    ShardTLSError,
    ShardUnavailableError,
    ShardVersionError,
)

__all__ = [
    "CacheBudgetError",
    "CacheStats",
    "ManifestError",
    "ShardAuthError",
    "ShardCache",
    "ShardDownloadError",
    "ShardError",
    "ShardInsecureError",
    "ShardIntegrityError",
    "ShardTLSError",
    "ShardUnavailableError",
    "ShardVersionError",
]

MAX_MANIFEST_BYTES = 8 << 20  # a signed manifest is a few KB; anything near this is not one
NEWEST_FILE = "newest.json"  # in manifests/: the newest version this device has accepted (rollback guard)


class ShardCache:
    """Download, verify and cache the shards of the latest (or a pinned) model version.

    Parameters
    ----------
    url : base URL of the shard server (``https://host:port``).
    cache_dir : where manifests and shards live on the device.
    public_key : the pinned Ed25519 public key (object, PEM bytes or PEM file path).
    modalities : the device's modalities (subset of ``image``, ``audio``).
    budget_bytes : upper bound of the bytes of cached shard files.
    token, device : per-device credentials sent with shard downloads (when the server requires them).
    ca_file : CA bundle (PEM) that the server's TLS certificate must chain to; None = system store.
    version : ``latest`` (follow publications) or a fixed version name.
    timeout : socket timeout per request, seconds.
    retries : further attempts (each resuming) after an interrupted download.
    retry_s : keep retrying a cut or refused download for at least this many seconds (backoff up to 2 s), so that
        a download rides out a shard server restart; 0: ``retries`` attempts only.
    chunk_bytes : read size while streaming a download.
    allow_insecure_http : send the token over plain ``http://`` (only on a network you trust, e.g. loopback).
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | Path,
        *,
        public_key: Ed25519PublicKey | bytes | str | Path,
        modalities: Sequence[str],
        budget_bytes: int = 64 << 20,
        token: str | None = None,
        device: str | None = None,
        ca_file: str | Path | None = None,
        version: str = LATEST,
        timeout: float = 10.0,
        retries: int = 2,
        retry_s: float = 0.0,
        chunk_bytes: int = 1 << 16,
        allow_insecure_http: bool = False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"shard server url {url!r} must start with http:// or https://")
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be > 0")
        if not modalities:
            raise ValueError("a device needs at least one modality")
        self.url = url.rstrip("/")
        self.dir = Path(cache_dir)
        self.public_key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
        self.modalities = tuple(modalities)
        self.budget = int(budget_bytes)
        self.token, self.device = token, device
        self.version = version
        self.timeout, self.retries, self.chunk = float(timeout), int(retries), int(chunk_bytes)
        self.retry_s = float(retry_s)
        self.allow_insecure_http = bool(allow_insecure_http)
        self.stats = CacheStats()
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._ssl),
            CredentialSafeRedirect(lambda: self.allow_insecure_http))
        self._manifest: Manifest | None = None
        self._pinned: set[str] = set()  # files (sha names) the current version needs now: never evicted
        self._check_transport()
        for sub in ("manifests", "shards", "partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ HTTP
    def _check_transport(self) -> None:
        check_transport(self.url, self.token, self.allow_insecure_http)

    def _open(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        self.stats.requests += 1
        return open_path(self._opener, self.url, path, headers or {}, self.timeout)

    def _auth_headers(self) -> dict[str, str]:
        return auth_headers(self.url, self.token, self.device, self.allow_insecure_http)

    # ------------------------------------------------------------------ manifest
    def manifest(self, *, refresh: bool = False) -> Manifest:
        """The verified manifest of the cache's version.

        Fetched from the server the first time (and when ``refresh``); when the server cannot be reached the
        last verified manifest in the cache is used (re-verified against the pinned key).

        Raises
        ------
        SignatureError
            The manifest (from the server or the cache) is not signed by the pinned key.
        ShardVersionError
            The manifest is not the pinned version, or is older than the newest this device has accepted.
        ShardUnavailableError
            Offline and nothing cached for this version.
        """
        if self._manifest is not None and not refresh:
            return self._manifest
        try:
            with self._open(manifest_path(self.version)) as r:
                envelope = r.read(MAX_MANIFEST_BYTES + 1)
            if len(envelope) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{self.url}: the manifest of {self.version} is over {MAX_MANIFEST_BYTES} "
                                    "bytes; refused")
            manifest = verify_manifest(envelope, self.public_key)  # before anything in it is trusted
            self._check_release(manifest)  # before it replaces what the cache holds
            self._store_manifest(manifest.version, envelope)
        except NET_ERRORS as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                raise
            manifest = self._cached_manifest(reason=f"{type(e).__name__}: {e}")
            self._check_release(manifest)
        self._set_manifest(manifest)
        return manifest

    def newest_seen(self) -> tuple[str, int, str] | None:
        """(version, serial, created) of the newest manifest this cache folder has accepted; None before any."""
        path = self.dir / "manifests" / NEWEST_FILE
        try:
            d = json.loads(path.read_bytes())
            return str(d["version"]), int(d["serial"]), str(d["created"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            # losing this file would silently disable rollback protection: say so instead
            raise ShardError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to trust the next "
                             "manifest again") from None

    def _check_release(self, manifest: Manifest) -> None:
        """Refuse a manifest that is not the pinned version or goes below the newest accepted; record it."""
        if self.version != LATEST and manifest.version != self.version:
            raise ShardVersionError(f"asked for model version {self.version!r} but the signed manifest is "
                                    f"{manifest.version!r}; refused")
        newest = self.newest_seen()
        if newest is not None:
            version, serial, created = newest
            if release_order(manifest) < (serial, created):
                raise ShardVersionError(
                    f"model version {manifest.version!r} (serial {manifest.serial}) is older than {version!r} "
                    f"(serial {serial}), which this device already accepted: rollback refused")
            if release_order(manifest) == (serial, created):
                return
        record = {"version": manifest.version, "serial": manifest.serial, "created": manifest.created}
        atomic_write(self.dir / "manifests" / NEWEST_FILE, json.dumps(record).encode())

    def _set_manifest(self, manifest: Manifest) -> None:
        self._manifest = manifest
        needed = set(base_shards(manifest, self.modalities))  # their ONNX files (a training-only base has none)
        self._pinned = {_cache_name(f) for f in manifest.shards("onnx") if f.name in needed}

    def _store_manifest(self, version: str, envelope: bytes) -> None:
        d = self.dir / "manifests"
        atomic_write(d / f"{version}.json", envelope)
        if self.version == LATEST:
            atomic_write(d / "LATEST", version.encode())

    def _cached_manifest(self, *, reason: str) -> Manifest:
        d = self.dir / "manifests"
        version = self.version
        if version == LATEST:
            try:
                version = (d / "LATEST").read_text().strip()
            except FileNotFoundError:
                raise ShardUnavailableError(f"server unreachable ({reason}) and no manifest cached") from None
        path = d / f"{version}.json"
        if not path.is_file():
            raise ShardUnavailableError(f"server unreachable ({reason}) and version {version} not cached")
        return verify_manifest(path.read_bytes(), self.public_key)

    # ------------------------------------------------------------------ shards
    def required(self) -> tuple[str, ...]:
        """Shards this device needs before routing (its encoders, router, head)."""
        return base_shards(self.manifest(), self.modalities)

    def ensure_base(self, progress: Callable[[str, int], None] | None = None) -> dict[str, Path]:
        """Make the device's base shards available locally; shard name -> path."""
        return {n: self.path(n, progress=progress) for n in self.required()}

    def device_experts(self) -> tuple[str, ...]:
        """Expert shards this device's router can ever select (its modalities' groups; all with shared experts)."""
        return device_experts(self.manifest(), self.modalities)

    def ensure_experts(self, progress: Callable[[str, int], None] | None = None) -> dict[str, Path]:
        """Prefetch every expert of the device's modality groups (e.g. before going offline); name -> path."""
        return {n: self.path(n, progress=progress) for n in self.device_experts()}

    def expert(self, index: int) -> Path:
        """Local path of expert ``index`` (downloaded the first time the router selects it)."""
        return self.path(expert_shard(index))

    def path(self, name: str, *, fmt: str = "onnx", progress: Callable[[str, int], None] | None = None) -> Path:
        """Local, verified path of shard ``name`` in format ``fmt``; downloads it when needed.

        Raises
        ------
        ShardIntegrityError
            The downloaded bytes do not hash to the manifest's sha256 (they are deleted).
        ShardUnavailableError
            Not cached and the server cannot be reached.
        """
        manifest = self.manifest()
        entry = manifest.file(name, fmt)
        if entry.modality is not None and entry.modality not in self.modalities:
            raise ShardError(f"shard {name!r} is for modality {entry.modality!r}, which this device lacks")
        cname = _cache_name(entry)
        self._pinned.add(cname)
        dest = self.dir / "shards" / cname
        if dest.is_file():
            # hashed on every open, not once per process: a file changed on disk since is fetched again
            if sha256_file(dest) == entry.sha256:
                self.stats.hits += 1
                os.utime(dest)  # LRU clock
                return dest
            dest.unlink()  # corrupted or tampered with on disk: fetch again
        self._make_room(entry.bytes)
        self._download(manifest.version, entry, dest, progress)
        self._make_room(0)
        return dest

    def _download(
        self, version: str, entry: ShardFile, dest: Path, progress: Callable[[str, int], None] | None
    ) -> None:
        download(shard_path(version, entry.file), entry, self.dir / "partial" / (_cache_name(entry) + ".part"), dest,
                 version=version, open_=self._open, credentials=self._auth_headers, retries=self.retries,
                 retry_s=self.retry_s, chunk_bytes=self.chunk, stats=self.stats, progress=progress)

    # ------------------------------------------------------------------ LRU
    def cached_bytes(self) -> int:
        """Bytes of complete shard files in the cache."""
        return sum(p.stat().st_size for p in (self.dir / "shards").iterdir() if p.is_file())

    def cached_files(self) -> list[str]:
        """Names of the complete shard files in the cache."""
        return sorted(p.name for p in (self.dir / "shards").iterdir() if p.is_file())

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used, unpinned files until ``incoming`` more bytes fit in the budget."""
        files = [p for p in (self.dir / "shards").iterdir() if p.is_file()]
        total = sum(p.stat().st_size for p in files) + incoming
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.budget:
                break
            if p.name in self._pinned:
                continue
            total -= p.stat().st_size
            p.unlink()
            self.stats.evicted += 1
        if total > self.budget:
            raise CacheBudgetError(
                f"the shards needed now take {total} bytes, over the cache budget of {self.budget} bytes"
            )

    def unpin(self, names: Iterable[str]) -> None:
        """Let the LRU evict these shards (e.g. experts the router has not chosen for a while)."""
        m = self.manifest()
        for n in names:
            self._pinned.discard(_cache_name(m.file(n)))

    # ------------------------------------------------------------------ shards rebuilt on the device
    def cached_content(self, sha256: str, fmt: str) -> Path | None:
        """The cached file with content ``sha256`` in format ``fmt`` (hashed now), with no request; else None.

        Content-addressed, so it finds a shard of any version this cache holds (e.g. the base shard a delta
        applies to) without fetching that version's manifest.
        """
        path = self.dir / "shards" / f"{sha256}.{fmt}"
        if not path.is_file() or sha256_file(path) != sha256:
            return None
        self.stats.hits += 1
        os.utime(path)  # LRU clock
        return path

    def install(self, name: str, data: bytes, *, fmt: str = "safetensors") -> Path:
        """Cache bytes rebuilt on the device (a base shard from a delta) as shard ``name`` of this version.

        Raises
        ------
        ShardIntegrityError
            The bytes do not hash to the manifest's sha256 (nothing is written).
        """
        entry = self.manifest().file(name, fmt)
        got = hashlib.sha256(data).hexdigest()
        if got != entry.sha256:
            raise ShardIntegrityError(f"rebuilt shard {entry.file}: sha256 {got[:16]}... != manifest "
                                      f"{entry.sha256[:16]}...; refused")
        cname = _cache_name(entry)
        self._pinned.add(cname)
        self._make_room(len(data))
        dest = self.dir / "shards" / cname
        atomic_write(dest, data)
        return dest


def _cache_name(entry: ShardFile) -> str:
    return f"{entry.sha256}.{entry.format}"
