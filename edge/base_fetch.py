"""Fetch a published base by version: the training shards a device needs, as a delta when it holds the last base.

A TRAIN message names its base by model store version (:data:`fedge.common.wire.BASE_MODEL`). :func:`fetch_base`
reads that version's signed manifest, takes the training (safetensors) shards this device's modalities need
(their encoders, the router, the head and the experts they can route to), and for each:

1. uses the copy it holds when the content is unchanged (content-addressed: same sha256, no download);
2. else, when the manifest offers a delta against a shard the device holds, downloads the delta, rebuilds the
   shard (:func:`fedge.common.base_delta.apply_delta`) and keeps it only if it hashes to the signed sha256;
3. else downloads the whole shard.

The shards become one base file (``<version>.<modalities>.safetensors``) that :func:`fedge.common.base_weights.
load_base_file` loads; a modality the device lacks keeps the weights of ``fill`` (it never sees that input).

Sources share one interface (:class:`ShardSource`): :class:`HttpSource` is a device's :class:`fedge.edge.shards.
ShardCache` over HTTPS with its token (verified manifests, resumed downloads, a bounded LRU cache that
survives restarts); :class:`StoreSource` reads a model store directory in place (simulations in one host).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.common.base_delta import apply_delta, read_shard, shard_bytes
from fedge.common.codec import CodecError
from fedge.common.config import MODALITIES
from fedge.common.fsio import atomic_path
from fedge.common.manifest import (
    Manifest,
    ManifestError,
    base_shards,
    device_experts,
    load_public_key,
    sha256_file,
    verify_manifest,
)
from fedge.common.pki_files import SIGNING_DIR, SIGNING_PUBLIC_KEY
from fedge.common.shard_api import MANIFEST_FILE

from .shards import ShardCache, ShardIntegrityError

__all__ = [
    "KEEP_BASES",
    "FetchReport",
    "HttpSource",
    "ShardSource",
    "StoreSource",
    "fetch_base",
    "needed_shards",
    "report_json",
]

KEEP_BASES = 2  # rebuilt base files kept per folder: the current one and the one before


class ShardSource(Protocol):
    """Where a device gets the shards of a published version."""

    def manifest(self, version: str) -> Manifest:
        """The verified manifest of ``version``."""
        ...

    def cached(self, sha256: str, fmt: str) -> Path | None:
        """A local, hash-checked file with this content, without any download; None when not held."""
        ...

    def fetch(self, version: str, name: str, fmt: str) -> Path:
        """A local, hash-checked copy of shard ``name`` in format ``fmt`` of ``version`` (downloaded if needed)."""
        ...

    def install(self, version: str, name: str, data: bytes) -> Path:
        """Keep bytes rebuilt on the device as the training shard ``name`` of ``version`` (hash-checked)."""
        ...

    def downloaded_bytes(self) -> int:
        """Bytes received over the network so far."""
        ...


class HttpSource:
    """A device's shard server over HTTPS, through its :class:`ShardCache` (one cache folder for all versions)."""

    def __init__(self, url: str, cache_dir: str | Path, *, public_key: Ed25519PublicKey | str | Path,
                 modalities: tuple[str, ...], budget_bytes: int, token: str | None = None,
                 device: str | None = None, ca_file: str | Path | None = None, timeout: float = 10.0,
                 retries: int = 4, retry_s: float = 0.0, allow_insecure_http: bool = False) -> None:
        self.url, self.dir = url, Path(cache_dir)
        self.public_key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
        self._kw: dict[str, Any] = {"public_key": self.public_key, "modalities": modalities, "budget_bytes": budget_bytes,
                    "token": token, "device": device, "ca_file": ca_file, "timeout": timeout, "retries": retries, "retry_s": retry_s,
                    "allow_insecure_http": allow_insecure_http}
        self._caches: dict[str, ShardCache] = {}
        self._done_bytes = 0  # downloads of caches already dropped

    def _cache(self, version: str) -> ShardCache:
        if version not in self._caches:
            while len(self._caches) >= KEEP_BASES:
                self._done_bytes += self._caches.pop(next(iter(self._caches))).stats.downloaded_bytes
            self._caches[version] = ShardCache(self.url, self.dir, version=version, **self._kw)
        return self._caches[version]

    def manifest(self, version: str) -> Manifest:
        return self._cache(version).manifest()

    def cached(self, sha256: str, fmt: str) -> Path | None:
        any_cache = next(reversed(self._caches.values()), None)
        return any_cache.cached_content(sha256, fmt) if any_cache is not None else None

    def fetch(self, version: str, name: str, fmt: str) -> Path:
        return self._cache(version).path(name, fmt=fmt)

    def install(self, version: str, name: str, data: bytes) -> Path:
        return self._cache(version).install(name, data)

    def downloaded_bytes(self) -> int:
        return self._done_bytes + sum(c.stats.downloaded_bytes for c in self._caches.values())


class StoreSource:
    """A model store directory read in place (a simulation's devices share the host with the publisher).

    Manifests are checked against ``public_key`` when given, else against ``<root>/.signing/manifest.pub``
    (the key the publisher generated in the store); every shard against its signed sha256.
    """

    def __init__(self, root: str | Path, *, public_key: Ed25519PublicKey | str | Path | None = None) -> None:
        self.root = Path(root)
        key = public_key if public_key is not None else self.root / SIGNING_DIR / SIGNING_PUBLIC_KEY
        self.public_key = key if isinstance(key, Ed25519PublicKey) else load_public_key(key)

    def manifest(self, version: str) -> Manifest:
        path = self.root / version / MANIFEST_FILE
        if "/" in version or version.startswith(".") or not path.is_file():
            raise ManifestError(f"model version {version!r} is not in the store {self.root}")
        return verify_manifest(path.read_bytes(), self.public_key)

    def cached(self, sha256: str, fmt: str) -> Path | None:
        return None  # every shard is local: fetch() costs no download

    def fetch(self, version: str, name: str, fmt: str) -> Path:
        entry = self.manifest(version).file(name, fmt)
        path = self.root / version / entry.file
        if sha256_file(path) != entry.sha256:
            raise ShardIntegrityError(f"{path}: sha256 differs from the signed manifest")
        return path

    def install(self, version: str, name: str, data: bytes) -> Path:
        return self.fetch(version, name, "safetensors")

    def downloaded_bytes(self) -> int:
        return 0


@dataclass
class FetchReport:
    """How a base arrived: shards held, rebuilt from deltas, downloaded whole; bytes over the network."""

    version: str
    path: Path
    held: int = 0
    from_delta: int = 0
    full: int = 0
    downloaded_bytes: int = 0


def needed_shards(manifest: Manifest, modalities: tuple[str, ...]) -> tuple[str, ...]:
    """Training shards a device with ``modalities`` needs: its encoders, router, head and reachable experts."""
    return (*base_shards(manifest, modalities), *device_experts(manifest, modalities))


def fetch_base(source: ShardSource, version: str, modalities: tuple[str, ...], out_dir: str | Path, *,
               fill: Callable[[], Mapping[str, torch.Tensor]]) -> FetchReport:
    """Make the base ``version`` a local safetensors file for a device with ``modalities``; see the module doc.

    ``fill``: gives plain base weights (e.g. the seed's init) for what the device's shards do not hold.

    Raises
    ------
    ManifestError, fedge.edge.shards.ShardError
        The manifest is not signed by the pinned key, is older than one already accepted, or a shard can be
        neither found nor downloaded intact.
    """
    out_dir = Path(out_dir)
    out = out_dir / f"{version}.{'+'.join(m for m in MODALITIES if m in modalities)}.safetensors"
    before = source.downloaded_bytes()
    report = FetchReport(version=version, path=out)
    if out.is_file():
        report.held = -1  # already rebuilt
        return report
    manifest = source.manifest(version)
    tensors: dict[str, np.ndarray] = {}
    for name in needed_shards(manifest, modalities):
        full = manifest.file(name, "safetensors")
        path = source.cached(full.sha256, "safetensors")
        if path is not None:
            report.held += 1
        else:
            path = _rebuild_from_delta(source, manifest, name)
            if path is not None:
                report.from_delta += 1
            else:
                path = source.fetch(version, name, "safetensors")
                report.full += 1
        tensors.update(read_shard(path.read_bytes()))
    state = _model_state(tensors, fill())
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"version": version, "manifest_serial": str(manifest.serial)})
    _prune(out_dir, keep=out)
    report.downloaded_bytes = source.downloaded_bytes() - before
    return report


def _rebuild_from_delta(source: ShardSource, manifest: Manifest, name: str) -> Path | None:
    """The shard rebuilt from its delta and the held shard it applies to; None when that is not possible."""
    try:
        delta = manifest.file(name, "delta")
    except KeyError:
        return None
    assert delta.delta_from is not None
    held = source.cached(delta.delta_from, "safetensors")
    if held is None:
        return None
    try:
        payload = source.fetch(manifest.version, name, "delta").read_bytes()
        data = shard_bytes(apply_delta(read_shard(held.read_bytes()), payload), name)
        return source.install(manifest.version, name, data)
    except (CodecError, ShardIntegrityError, ValueError):
        return None  # the rebuild is not the signed shard: download it whole


def _model_state(tensors: Mapping[str, np.ndarray], fill: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shard tensors (``modality_embed.<m>`` rows apart) over ``fill`` -> the model's plain state dict."""
    state = {k: v.detach().clone().contiguous() for k, v in fill.items()}
    embed = state["modality_embed"]
    for k, v in tensors.items():
        if k.startswith("modality_embed."):
            embed[MODALITIES.index(k.split(".", 1)[1])] = torch.from_numpy(np.array(v))
        elif k not in state:
            raise ManifestError(f"shard tensor {k!r} is not a weight of the configured model")
        else:
            state[k] = torch.from_numpy(np.array(v))  # a shape that does not fit: load_base_file names it
    return state


def _prune(out_dir: Path, *, keep: Path) -> None:
    # hidden names are other writers' temporaries (fedge.common.fsio), not bases
    files = sorted((p for p in out_dir.glob("*.safetensors") if not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for p in files[KEEP_BASES:]:
        if p != keep:
            p.unlink(missing_ok=True)


def report_json(report: FetchReport) -> str:
    """One JSON line for logs."""
    return json.dumps({"version": report.version, "held": report.held, "from_delta": report.from_delta,
                       "full": report.full, "downloaded_bytes": report.downloaded_bytes})
