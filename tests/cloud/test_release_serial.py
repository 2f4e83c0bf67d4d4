"""Publication serials: signed into each manifest, one above every published version, so devices can tell an
older version replayed as current from a newer one."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.cloud.model_store import ModelStore
from fedge.common.manifest import (
    Manifest,
    ManifestError,
    ShardFile,
    release_order,
    sign_manifest,
    verify_manifest,
)

KEY = Ed25519PrivateKey.generate()


def _manifest(version: str, serial: int, created: str = "2026-01-01T00:00:00+00:00") -> Manifest:
    head = ShardFile(name="head", kind="head", modality=None, format="onnx", file="head.onnx", sha256="0" * 64,
                     bytes=1)
    return Manifest(version=version, model={"num_experts": 1}, files=(head,), created=created, serial=serial)


def _exported(tmp_path, version: str, serial: int):
    d = tmp_path / f"export-{version}"
    d.mkdir()
    (d / "manifest.json").write_bytes(sign_manifest(_manifest(version, serial), KEY))
    return d


def test_serial_is_signed_and_orders_releases_before_their_creation_time():
    m = verify_manifest(sign_manifest(_manifest("v2", 2), KEY), KEY.public_key())
    assert m.serial == 2
    assert release_order(_manifest("a", 1, "2027-01-01")) < release_order(_manifest("b", 2, "2026-01-01"))
    assert release_order(_manifest("a", 0, "2026-01-01")) < release_order(_manifest("b", 0, "2026-01-02"))
    env = json.loads(sign_manifest(_manifest("v2", 2), KEY))
    env["manifest"]["serial"] = 9  # a raised serial breaks the signature
    with pytest.raises(ManifestError, match="signature"):
        verify_manifest(json.dumps(env).encode(), KEY.public_key())
    old = json.loads(sign_manifest(_manifest("v0", 0), KEY))
    del old["manifest"]["serial"]  # written before serials existed
    assert Manifest.from_dict(old["manifest"]).serial == 0
    with pytest.raises(ManifestError, match="serial"):
        _manifest("v", -1)


def test_store_hands_out_the_next_serial_and_refuses_one_not_above_the_published(tmp_path):
    store = ModelStore(tmp_path / "store")
    assert store.next_serial() == 1
    store.publish_dir(_exported(tmp_path, "v1", 1), "v1")
    store.publish_dir(_exported(tmp_path, "v2", 2), "v2")
    assert store.next_serial() == 3
    with pytest.raises(ManifestError, match="serial 2 is not above"):  # a publisher that lost the race
        store.publish_dir(_exported(tmp_path, "v3", 2), "v3")
    assert store.index() == {"versions": ["v1", "v2"], "latest": "v2"}
    store.publish_dir(_exported(tmp_path, "v0", 0), "v0")  # unnumbered exports keep working
    assert store.next_serial() == 3
