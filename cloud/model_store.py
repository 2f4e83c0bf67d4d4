"""The on-disk store of published model versions that the ShardServer serves from.

Layout under ``root``::

    index.json            {"versions": [...in publish order], "latest": "..."}   replaced atomically
    <version>/            manifest.json (signed) + <shard>.onnx + <shard>.safetensors, immutable once published
    .staging-*/           exports in progress (never served)

Publishing is atomic: a version is exported into a staging directory, renamed into place (one ``rename``),
and only then does ``index.json`` (written with :func:`fedge.common.fsio.atomic_write`) name it. A reader sees the
old index or the new one, never half a version; versions are never modified, so a request that resolved
``latest`` to the old version keeps reading consistent files while the new one goes live.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from fedge.common.fsio import atomic_write
from fedge.common.manifest import MANIFEST_KEY, Manifest, ManifestError, verify_manifest
from fedge.common.shard_api import INDEX_FILE, LATEST, MANIFEST_FILE

from .export import export_version

__all__ = ["ModelStore", "StoreError"]


class StoreError(LookupError):
    """A version or shard file is not in the store."""


class ModelStore:
    """Read and publish model versions under ``root`` (safe for many readers and concurrent publishers)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifests: dict[str, Manifest] = {}

    # ------------------------------------------------------------------ reading
    def index(self) -> dict[str, Any]:
        """The current index (``{"versions": [], "latest": None}`` for an empty store)."""
        try:
            return dict(json.loads((self.root / INDEX_FILE).read_text()))
        except FileNotFoundError:
            return {"versions": [], "latest": None}

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return list(self.index()["versions"])

    def resolve(self, version: str) -> str:
        """A concrete version for ``version`` (``latest`` is an alias); :class:`StoreError` when unknown."""
        idx = self.index()
        if version == LATEST:
            if not idx["latest"]:
                raise StoreError("no model version has been published yet")
            return str(idx["latest"])
        if version not in idx["versions"]:
            raise StoreError(f"unknown model version {version!r}")
        return version

    def manifest_bytes(self, version: str) -> bytes:
        """The signed manifest envelope of ``version`` exactly as exported."""
        v = self.resolve(version)
        return (self.root / v / MANIFEST_FILE).read_bytes()

    def manifest(self, version: str) -> Manifest:
        """The parsed manifest of ``version`` (cached: published versions are immutable)."""
        v = self.resolve(version)
        if v not in self._manifests:
            env = json.loads(self.manifest_bytes(v))
            self._manifests[v] = Manifest.from_dict(env[MANIFEST_KEY])
        return self._manifests[v]

    def shard_path(self, version: str, file: str) -> tuple[Path, str, int]:
        """(path, sha256, bytes) of shard ``file`` of ``version``; only files the manifest lists are served."""
        v = self.resolve(version)
        try:
            entry = self.manifest(v).by_file(file)
        except KeyError:
            raise StoreError(f"version {v} has no shard file {file!r}") from None
        return self.root / v / entry.file, entry.sha256, entry.bytes

    def version_dir(self, version: str) -> Path:
        """Directory of a published version."""
        return self.root / self.resolve(version)

    def next_serial(self) -> int:
        """The serial the next published version must sign into its manifest (one above every published one).

        Devices refuse a manifest older than the newest they have seen; serials make "older" exact even for
        versions exported within the same second.
        """
        return 1 + max((self.manifest(v).serial for v in self.versions()), default=0)

    # ------------------------------------------------------------------ publishing
    def publish(
        self,
        model: Any,
        *,
        version: str,
        private_key: Any,
        image_size: int,
        audio_frames: int,
        public_key: Any | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Manifest:
        """Export ``model`` as ``version`` and make it the latest, atomically.

        ``public_key``, when given, is used to verify the freshly written manifest before it goes live.

        Raises
        ------
        FileExistsError
            ``version`` is already published (versions are immutable).
        """
        if version == LATEST or (self.root / version).exists():
            raise FileExistsError(f"model version {version!r} already exists in {self.root}")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.root))
        try:
            manifest = export_version(
                model,
                staging,
                version=version,
                private_key=private_key,
                image_size=image_size,
                audio_frames=audio_frames,
                progress=progress,
                serial=self.next_serial(),
            )
            if public_key is not None:
                verify_manifest((staging / MANIFEST_FILE).read_bytes(), public_key)
            self.publish_dir(staging, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def publish_dir(self, directory: str | Path, version: str) -> None:
        """Move an exported directory into the store as ``version`` and point ``latest`` at it.

        A manifest with a serial must carry one above every published version's (:meth:`next_serial`):
        devices would refuse it as a rollback otherwise, so two publishers racing cannot both go live.
        """
        src = Path(directory)
        env = json.loads((src / MANIFEST_FILE).read_bytes())
        named = env.get(MANIFEST_KEY, {}).get("version")
        if named != version:
            raise ManifestError(f"{src}: manifest names version {named!r}, not {version!r}")
        serial = env[MANIFEST_KEY].get("serial", 0)
        with self._lock():
            dst = self.root / version
            if dst.exists():
                raise FileExistsError(f"model version {version!r} already exists in {self.root}")
            if serial and serial < self.next_serial():
                raise ManifestError(f"{src}: manifest serial {serial} is not above the published versions' "
                                    f"(next is {self.next_serial()}); export it again")
            os.rename(src, dst)  # atomic on one filesystem
            idx = self.index()
            idx["versions"] = [*idx["versions"], version]
            idx["latest"] = version
            self._write_index(idx)

    def set_latest(self, version: str) -> None:
        """Point ``latest`` at an already published version, atomically.

        Devices that already hold a newer version refuse the older one (rollback protection): to go back to an
        older model, publish its weights again as a new version."""
        with self._lock():
            idx = self.index()
            if version not in idx["versions"]:
                raise StoreError(f"unknown model version {version!r}")
            idx["latest"] = version
            self._write_index(idx)

    def _write_index(self, idx: dict[str, Any]) -> None:
        # the directory fsync after the replace also makes the version folder's rename durable
        atomic_write(self.root / INDEX_FILE, json.dumps(idx))

    def _lock(self) -> _FileLock:
        return _FileLock(self.root / ".lock")


class _FileLock:
    """An exclusive ``flock`` on a file, for publishers in different processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None

    def __enter__(self) -> Self:
        self._fh = open(self.path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
