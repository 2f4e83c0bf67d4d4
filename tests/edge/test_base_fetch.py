"""Fetching a published base by version: held shards, deltas rebuilt exactly, full downloads as the fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.cloud.export import load_state_from_shards
from fedge.cloud.publisher import BasePublisher, plain_from_state
from fedge.common.base_delta import apply_delta, read_shard, shard_bytes, snap_to_delta
from fedge.common.lora import base_state
from fedge.common.manifest import generate_keypair, sha256_file
from fedge.common.model import build_model
from fedge.edge.base_fetch import StoreSource, fetch_base, needed_shards

KW = {"dim": 32, "num_experts": 4, "top_k": 2, "expert_hidden": 32, "num_classes": 10, "n_mels": 40,
      "precision": None}


class CountingSource(StoreSource):
    """A store read in place that behaves like a device's cache: it holds what it fetched or rebuilt, by
    content, and counts the bytes it had to 'download'."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.held: dict[str, Path] = {}
        self.bytes = 0

    def cached(self, sha256: str, fmt: str) -> Path | None:
        return self.held.get(f"{sha256}.{fmt}")

    def fetch(self, version: str, name: str, fmt: str) -> Path:
        path = super().fetch(version, name, fmt)
        entry = self.manifest(version).file(name, fmt)
        self.bytes += entry.bytes
        self.held[f"{entry.sha256}.{fmt}"] = path
        return path

    def install(self, version: str, name: str, data: bytes) -> Path:
        entry = self.manifest(version).file(name, "safetensors")
        path = self.root / version / entry.file
        assert sha256_file(path) == entry.sha256
        self.held[f"{entry.sha256}.safetensors"] = path
        return path

    def downloaded_bytes(self) -> int:
        return self.bytes


def _perturbed(model: torch.nn.Module, scale: float, seed: int, only: str = "") -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(only):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """base-000000 (the seed's init), base-000004 (every weight trained), base-000006 (only the head)."""
    root = tmp_path_factory.mktemp("bases") / "models"
    key, _ = generate_keypair(root / ".signing")
    pub = BasePublisher(root, key, image_size=32, audio_frames=32, onnx=False)
    m = build_model(**KW)
    pub.publish(m, version="base-000000")
    _, published = pub.publish(_perturbed(m, 0.01, 1), version="base-000004")
    # the next base starts from the published one (the aggregator rebases on exactly what devices rebuild)
    pub.publish(_perturbed(plain_from_state(published, KW), 0.01, 2, only="head."), version="base-000006")
    return root


def _fill() -> dict[str, torch.Tensor]:
    return base_state(build_model(**KW))


def _published(root: Path, version: str) -> dict[str, torch.Tensor]:
    src = StoreSource(root)
    return load_state_from_shards(root / version, src.manifest(version))


def test_a_delta_is_exact_by_construction_and_its_rebuild_hashes_like_the_published_shard():
    rng = np.random.default_rng(0)
    old = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=(8,)).astype(np.float32)}
    new = {k: v + rng.normal(size=v.shape).astype(np.float32) * 0.01 for k, v in old.items()}
    payload, snapped = snap_to_delta(old, new)
    rebuilt = apply_delta(old, payload)
    assert shard_bytes(rebuilt, "s") == shard_bytes(snapped, "s")  # bit for bit, so the sha256 too
    step = max(float(np.abs(new[k] - old[k]).max()) / 127 for k in new)
    assert all(float(np.abs(snapped[k] - new[k]).max()) <= step / 2 + 1e-7 for k in new)
    assert read_shard(shard_bytes(snapped, "s")).keys() == snapped.keys()


def test_a_device_holding_the_last_base_gets_the_next_one_as_deltas_of_a_quarter_of_the_bytes(store, tmp_path):
    src = CountingSource(store)
    first = fetch_base(src, "base-000000", ("image", "audio"), tmp_path, fill=_fill)
    assert first.full == len(needed_shards(src.manifest("base-000000"), ("image", "audio"))) and first.from_delta == 0
    full_bytes = src.manifest("base-000004").total_bytes("safetensors")
    assert first.downloaded_bytes == src.manifest("base-000000").total_bytes("safetensors")

    second = fetch_base(src, "base-000004", ("image", "audio"), tmp_path, fill=_fill)
    assert second.full == 0 and second.from_delta == first.full
    assert second.downloaded_bytes <= 0.3 * full_bytes
    got = read_shard(second.path.read_bytes())
    want = _published(store, "base-000004")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k].numpy()) for k in want)

    third = fetch_base(src, "base-000006", ("image", "audio"), tmp_path, fill=_fill)  # only the head changed
    assert third.from_delta == 1 and third.full == 0 and third.held == first.full - 1


def test_a_mic_only_device_fetches_only_its_shards_and_keeps_its_own_image_weights(store, tmp_path):
    src = CountingSource(store)
    rep = fetch_base(src, "base-000004", ("audio",), tmp_path, fill=_fill)
    manifest = src.manifest("base-000004")
    assert not any(k.endswith(".safetensors") and "encoder.image" in str(p) for k, p in src.held.items())
    assert rep.downloaded_bytes < manifest.total_bytes("safetensors") - manifest.file("encoder.image",
                                                                                       "safetensors").bytes + 1
    got = read_shard(rep.path.read_bytes())
    want, fill = _published(store, "base-000004"), _fill()
    assert np.array_equal(got["encoders.audio.conv.0.weight"], want["encoders.audio.conv.0.weight"].numpy())
    assert np.array_equal(got["encoders.image.conv.0.weight"], fill["encoders.image.conv.0.weight"].numpy())


def test_a_delta_that_does_not_rebuild_the_signed_shard_falls_back_to_the_full_download(store, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(store, copy)
    src = CountingSource(copy)
    fetch_base(src, "base-000000", ("audio",), tmp_path / "a", fill=_fill)
    delta = copy / "base-000004" / "head.delta"
    data = bytearray(delta.read_bytes())
    data[-8] ^= 0xFF  # the CRC or the values: either way not the signed content
    delta.write_bytes(bytes(data))
    rep = fetch_base(src, "base-000004", ("audio",), tmp_path / "b", fill=_fill)
    assert rep.full == 1 and rep.from_delta == rep.held + rep.from_delta + rep.full - 1
    got = read_shard(rep.path.read_bytes())
    want = _published(store, "base-000004")
    assert np.array_equal(got["head.fc2.weight"], want["head.fc2.weight"].numpy())
