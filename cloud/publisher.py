"""One publisher for every new base: a signed, content-addressed model version in the :class:`ModelStore`.

A base from global training inside the federation, from ``fedge cloud train`` or ``fedge cloud publish``, and
every inference export become one version: safetensors training shards (an encoder per modality, the router,
each expert, the head), ONNX inference shards, and, per training shard that changed, a compressed *delta*
against the same shard of the previous version (:mod:`fedge.common.base_delta`), all listed with their sha256 under
the Ed25519-signed manifest and its serial (monotonic: the store assigns one above every published version).

The new base is published as the previous base plus the decoded delta (exact on devices, see
:func:`fedge.common.base_delta.snap_to_delta`); :meth:`BasePublisher.publish` returns that state so the aggregator
rebases on precisely the weights devices will rebuild. The ShardServer serves whatever ``latest`` names, so a
publication is live for Ray Serve's ``/v1/predict`` and for device downloads at once (no redeploy).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.common.base_delta import DeltaError, read_shard, same_layout, snap_to_delta
from fedge.common.manifest import Manifest, ShardFile, load_private_key, sha256_bytes, verify_manifest
from fedge.common.model import MultimodalMoE
from fedge.common.shard_api import MANIFEST_FILE

from .export import export_version, plain_model, shard_modules
from .model_store import ModelStore, StoreError

__all__ = ["BasePublisher", "base_version_name", "plain_from_state"]


def base_version_name(base_version: int) -> str:
    """The store version of the base trained from aggregated version ``base_version`` (sorts by number)."""
    return f"base-{int(base_version):06d}"


class BasePublisher:
    """Publish bases into one store, each with deltas against the version published before it.

    Parameters
    ----------
    store : the model store (its root may be served by the ShardServer at the same time).
    private_key : the Ed25519 key (object or PEM path) that signs manifests.
    image_size, audio_frames : encoder input sizes recorded in the manifest.
    onnx : export ONNX inference shards too (off: training shards only, seconds instead of tens of seconds).
    deltas : publish deltas against the previous version (off: full shards only).
    """

    def __init__(self, store: ModelStore | str | Path, private_key: Any, *, image_size: int, audio_frames: int,
                 onnx: bool = True, deltas: bool = True) -> None:
        self.store = store if isinstance(store, ModelStore) else ModelStore(store)
        self.private_key = load_private_key(private_key) if isinstance(private_key, (str, Path)) else private_key
        self.image_size, self.audio_frames = int(image_size), int(audio_frames)
        self.onnx, self.deltas = bool(onnx), bool(deltas)

    # ------------------------------------------------------------------ the previous version
    def _previous(self) -> tuple[Manifest | None, Path | None]:
        try:
            return self.store.manifest("latest"), self.store.version_dir("latest")
        except StoreError:
            return None, None

    @staticmethod
    def _held(manifest: Manifest, directory: Path) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
        """Shard name -> (sha256, tensors) of a published version's training shards."""
        return {f.name: (f.sha256, read_shard((directory / f.file).read_bytes()))
                for f in manifest.shards("safetensors")}

    # ------------------------------------------------------------------ publishing
    def published(self, version: str) -> Manifest | None:
        """The manifest of ``version`` when it is already in the store."""
        try:
            return self.store.manifest(version) if version in self.store.versions() else None
        except StoreError:
            return None

    @torch.no_grad()
    def publish(self, model: MultimodalMoE, *, version: str,
                progress: Callable[[str], None] | None = None) -> tuple[Manifest, dict[str, np.ndarray]]:
        """Publish ``model`` (LoRA merged; not modified) as ``version`` and make it the latest.

        Returns the manifest and the published plain state (model weight names -> float32 arrays): the
        model's weights, except that every shard delivered as a delta holds previous + decoded delta.

        Raises
        ------
        FileExistsError
            ``version`` is already published (versions are immutable).
        """
        if (self.store.root / version).exists():
            raise FileExistsError(f"model version {version!r} already exists in {self.store.root}")
        plain = plain_model(model)
        prev, prev_dir = self._previous()
        held = self._held(prev, prev_dir) if (prev is not None and prev_dir is not None and self.deltas) else {}
        graphs = ({f.name: (prev_dir / f.file).read_bytes() for f in prev.shards("onnx")}
                  if prev is not None and prev_dir is not None else {})
        deltas: dict[str, tuple[bytes, str]] = {}  # shard -> (payload, sha256 of the shard it applies to)
        meta: dict[str, tuple[str, str | None, int | None]] = {}
        for name, (_, kind, modality, state) in shard_modules(plain).items():
            meta[name] = (kind, modality, int(name.split(".")[1]) if kind == "expert" else None)
            if name not in held:
                continue
            old_sha, old = held[name]
            new = {k: v.detach().cpu().numpy() for k, v in state.items()}
            if not same_layout(old, new) or all(np.array_equal(old[k], new[k]) for k in new):
                continue  # another architecture (full download), or unchanged (the same sha256: no download)
            try:
                payload, snapped = snap_to_delta(old, new)
            except DeltaError:
                continue
            for k, v in state.items():  # views of the plain model's parameters: the model takes the snap
                v.copy_(torch.from_numpy(snapped[k]))
            deltas[name] = (payload, old_sha)

        def delta_files(_: dict[str, dict[str, np.ndarray]]) -> list[tuple[ShardFile, bytes]]:
            out = []
            for name, (payload, old_sha) in sorted(deltas.items()):
                kind, modality, expert = meta[name]
                out.append((ShardFile(name=name, kind=kind, modality=modality, format="delta",
                                      file=f"{name}.delta", sha256=sha256_bytes(payload), bytes=len(payload),
                                      expert=expert, delta_from=old_sha), payload))
            return out

        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.store.root))
        try:
            manifest = export_version(plain, staging, version=version, private_key=self.private_key,
                                      image_size=self.image_size, audio_frames=self.audio_frames,
                                      progress=progress, serial=self.store.next_serial(), onnx=self.onnx,
                                      graphs=graphs, extra_files=delta_files)
            verify_manifest((staging / MANIFEST_FILE).read_bytes(), self.private_key.public_key())
            self.store.publish_dir(staging, version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        published = {k: v.detach().cpu().float().numpy().copy() for k, v in plain.state_dict().items()}
        return manifest, published


def plain_from_state(state: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any]) -> MultimodalMoE:
    """A plain fp32 :class:`MultimodalMoE` of ``model_kwargs`` holding ``state`` (plain weight names)."""
    from fedge.common.model import build_model

    m = build_model(**{**dict(model_kwargs), "precision": None})
    m.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    return m.eval()
