"""Manifest schema, canonical signing bytes, Ed25519 signature checks, shard selection per modality set."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.common.manifest import (
    Manifest,
    ManifestError,
    ShardFile,
    SignatureError,
    TensorSpec,
    base_shards,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)

SHA = "ab" * 32


def _manifest(version: str = "v1") -> Manifest:
    files = [ShardFile(name=f"encoder.{m}", kind="encoder", modality=m, format="onnx", file=f"encoder.{m}.onnx",
                       sha256=SHA, bytes=10, inputs=(TensorSpec(m, "float32", (None, 3)),), opset=18)
             for m in ("image", "audio")]
    files += [ShardFile(name=n, kind=n.split(".")[0], modality=None, format="onnx", file=f"{n}.onnx", sha256=SHA,
                        bytes=5) for n in ("router", "expert.0", "expert.1", "head")]
    return Manifest(version=version, model={"dim": 4}, files=tuple(files))


def test_signed_manifest_verifies_and_round_trips():
    key = Ed25519PrivateKey.generate()
    m = _manifest()
    assert verify_manifest(sign_manifest(m, key), key.public_key()) == m


def test_manifest_signed_by_another_key_is_refused():
    env = sign_manifest(_manifest(), Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(env, Ed25519PrivateKey.generate().public_key())


def test_altered_manifest_is_refused():
    key = Ed25519PrivateKey.generate()
    env = json.loads(sign_manifest(_manifest(), key))
    env["manifest"]["files"][0]["sha256"] = "cd" * 32  # swap in a hash of a forged shard
    with pytest.raises(SignatureError):
        verify_manifest(json.dumps(env).encode(), key.public_key())


@pytest.mark.parametrize("bad", [b"not json", b"{}", b'{"manifest": {}, "signature": "zz"}'])
def test_malformed_envelope_is_a_clear_error(bad):
    with pytest.raises(ManifestError):
        verify_manifest(bad, Ed25519PrivateKey.generate().public_key())


def test_bad_entries_are_refused():
    with pytest.raises(ManifestError, match="sha256"):
        ShardFile(name="head", kind="head", modality=None, format="onnx", file="head.onnx", sha256="x", bytes=1)
    with pytest.raises(ManifestError, match="kind"):
        ShardFile(name="h", kind="tail", modality=None, format="onnx", file="h.onnx", sha256=SHA, bytes=1)
    with pytest.raises(ManifestError, match="plain file name"):
        ShardFile(name="h", kind="head", modality=None, format="onnx", file="../h.onnx", sha256=SHA, bytes=1)
    with pytest.raises(ManifestError, match="latest"):
        _manifest("latest")


def test_base_shards_follow_the_device_modalities():
    m = _manifest()
    assert base_shards(m, ["audio"]) == ("encoder.audio", "router", "head")
    assert base_shards(m, ["image"]) == ("encoder.image", "router", "head")
    assert set(base_shards(m, ["image", "audio"])) == {"encoder.image", "encoder.audio", "router", "head"}
    with pytest.raises(ManifestError, match="unknown modality"):
        base_shards(m, ["text"])


def test_keypair_files_load_and_are_not_overwritten(tmp_path):
    priv, pub = generate_keypair(tmp_path)
    assert priv.stat().st_mode & 0o077 == 0
    key = load_private_key(priv)
    env = sign_manifest(_manifest(), key)
    verify_manifest(env, load_public_key(pub))
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_public_key(tmp_path / "missing.pub")
