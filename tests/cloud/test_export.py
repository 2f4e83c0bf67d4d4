"""Export: every shard's ONNX agrees with torch, LoRA is merged, the manifest lists true hashes, publishing is atomic."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.cloud.export import build_from_manifest, example_inputs, plain_model, shard_modules
from fedge.cloud.model_store import ModelStore, StoreError
from fedge.common.manifest import sha256_file, verify_manifest
from tests.shard_server import AUDIO_FRAMES, IMAGE_SIZE, make_model


def test_every_onnx_shard_agrees_with_torch(shard_store):
    store = shard_store.store
    man = store.manifest("v1")
    plain = plain_model(shard_store.model)
    modules = shard_modules(plain)
    assert {f.name for f in man.shards() if f.kind != "experts"} == set(modules)  # batched: test_experts_onnx
    for name, (module, _, _, _) in modules.items():
        entry = man.file(name)
        sess = ort.InferenceSession(str(store.version_dir("v1") / entry.file), providers=["CPUExecutionProvider"])
        for batch in (1, 7):  # the batch axis is dynamic
            args = example_inputs(name, man.model, batch, seed=100 + batch)
            got = sess.run(None, {spec.name: a.numpy() for spec, a in zip(entry.inputs, args.values())})
            with torch.no_grad():
                want = module(*args.values())
            want = want if isinstance(want, tuple) else (want,)
            for g, w in zip(got, want):
                assert g.shape == tuple(w.shape)
                assert np.max(np.abs(g - w.numpy()), initial=0.0) <= 1e-4, name
        assert man.extra["agreement"][name] <= 1e-4


def test_manifest_lists_true_hashes_sizes_and_io(shard_store):
    store = shard_store.store
    env = store.manifest_bytes("v1")
    man = verify_manifest(env, shard_store.private.public_key())
    for f in man.files:
        path = store.version_dir("v1") / f.file
        assert sha256_file(path) == f.sha256 and path.stat().st_size == f.bytes
    enc = man.file("encoder.image")
    assert (enc.kind, enc.modality, enc.opset) == ("encoder", "image", 18)
    assert enc.inputs[0].shape == (None, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert [o.name for o in man.file("router").outputs] == ["probs", "topk_idx", "gates"]
    assert man.file("expert.3", "safetensors").expert == 3
    assert man.model["top_k"] == 2 and man.model["audio_frames"] == AUDIO_FRAMES


def test_export_merges_lora_so_shards_are_plain(shard_store):
    store = shard_store.store
    rebuilt = build_from_manifest(store.version_dir("v1"), store.manifest("v1"))
    assert not any("lora" in k for k in rebuilt.state_dict())
    g = torch.Generator().manual_seed(5)
    img, aud = torch.rand(6, 3, 32, 32, generator=g), torch.randn(6, 40, 32, generator=g) * 10 - 40
    with torch.no_grad():
        want = shard_store.model(img, aud).logits  # the LoRA-wrapped original
        got = rebuilt(img, aud).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_publish_refuses_an_existing_version_and_leaves_no_staging(shard_store, tmp_path):
    store = ModelStore(tmp_path / "s")
    with pytest.raises(StoreError, match="no model version"):
        store.resolve("latest")
    store.publish_dir(_copy_version(shard_store, tmp_path / "copy"), "v1")
    assert store.index() == {"versions": ["v1"], "latest": "v1"}
    with pytest.raises(FileExistsError, match="already exists"):
        store.publish(make_model(1), version="v1", private_key=shard_store.private, image_size=32, audio_frames=32)
    assert not [p for p in store.root.iterdir() if p.name.startswith(".staging")]
    with pytest.raises(StoreError, match="unknown"):
        store.set_latest("v9")


def _copy_version(shard_store, dst):
    import shutil

    shutil.copytree(shard_store.store.version_dir("v1"), dst)
    assert json.loads((dst / "manifest.json").read_bytes())["manifest"]["version"] == "v1"
    return dst


def test_modality_affine_export_records_groups_and_every_onnx_shard_agrees(shard_store, modality_version):
    store = shard_store.store
    man = store.manifest(modality_version)
    assert man.model["expert_affinity"] == "modality"
    assert man.model["expert_groups"] == {"image": [0, 1, 4], "audio": [2, 3, 4]}
    assert [(f.name, f.modality) for f in man.shards() if f.kind == "expert"] == [
        ("expert.0", "image"), ("expert.1", "image"), ("expert.2", "audio"), ("expert.3", "audio"), ("expert.4", None)]
    router = man.file("router")
    assert [(t.name, t.dtype, t.shape) for t in router.inputs][2] == ("allowed", "bool", (None, 5))
    rebuilt = build_from_manifest(store.version_dir(modality_version), man)
    modules = shard_modules(rebuilt)
    for name, (module, _, _, _) in modules.items():
        entry = man.file(name)
        sess = ort.InferenceSession(str(store.version_dir(modality_version) / entry.file),
                                    providers=["CPUExecutionProvider"])
        args = example_inputs(name, man.model, 9, seed=7)
        got = sess.run(None, {spec.name: a.numpy() for spec, a in zip(entry.inputs, args.values())})
        with torch.no_grad():
            want = module(*args.values())
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            if g.dtype.kind == "i":  # topk_idx: the same experts, all inside each token's group
                assert np.array_equal(g, w.numpy()), name
            else:
                assert np.max(np.abs(g - w.numpy()), initial=0.0) <= 1e-4, name
        if name == "router":
            allowed = args["allowed"].numpy()
            assert np.take_along_axis(allowed, got[1], axis=1).all()  # never outside the group
    g = torch.Generator().manual_seed(6)
    img, aud = torch.rand(6, 3, 32, 32, generator=g), torch.randn(6, 40, 32, generator=g) * 10 - 40
    with torch.no_grad():
        want = make_model(seed=3, num_experts=5, shared_experts=1, top_k=2, expert_affinity="modality")(img, aud)
        assert torch.allclose(rebuilt(img, aud).logits, want.logits, atol=1e-5)
