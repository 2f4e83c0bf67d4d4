"""The batched experts ONNX graph (fedge.cloud.experts_onnx) gives what torch gives, in onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.cloud.experts_onnx import (
    BatchedExperts,
    batched_expert_groups,
    batched_experts_onnx,
    example_inputs,
)
from fedge.common.lora import apply_lora
from fedge.common.model import build_model


def _run(data, feeds):
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


@pytest.mark.parametrize("ids,k", [((0, 1, 2, 3, 4, 5), 2), ((2, 3, 5), 3), ((4,), 1)])
def test_onnxruntime_equals_torch_for_a_group_of_experts(ids, k):
    model = build_model(num_experts=6, top_k=1, seed=0).eval()
    experts = [model.experts[e] for e in ids]
    data = batched_experts_onnx(experts, ids, 6)
    twin = BatchedExperts(experts, ids, 6)
    for n in (1, 7, 64):  # one graph for every batch size: the group size is decided at run time
        feeds = example_inputs(ids, dim=model.dim, top_k=k, batch=n, seed=n)
        with torch.no_grad():
            want = twin(**feeds)
            # the model's own per-expert arithmetic as the reference
            ref = feeds["token"] + sum(feeds["gates"][:, j : j + 1] * torch.stack(
                [model.experts[int(e)](t) for e, t in zip(feeds["topk_idx"][:, j], feeds["token"])])
                for j in range(k))
        got = _run(data, feeds)
        assert np.max(np.abs(got - want.numpy())) <= 1e-5
        assert np.max(np.abs(got - ref.numpy())) <= 1e-5


def test_lora_adapters_are_folded_into_the_graph():
    model = apply_lora(build_model(num_experts=4, top_k=2, seed=0), rank=2, alpha=4.0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("experts.") and "lora_B" in name:
                p.normal_(0, 0.5)
    ids = (0, 1, 2, 3)
    feeds = example_inputs(ids, dim=model.dim, top_k=2, batch=9)
    with torch.no_grad():
        want = BatchedExperts(list(model.experts), ids, 4)(**feeds)
    assert np.max(np.abs(_run(batched_experts_onnx(list(model.experts), ids, 4), feeds) - want.numpy())) <= 1e-5


def test_one_shard_for_shared_experts_one_per_modality_group_otherwise():
    assert batched_expert_groups({"image": (0, 1, 2), "audio": (0, 1, 2)}) == {None: (0, 1, 2)}
    assert batched_expert_groups({"image": (0, 1, 4), "audio": (2, 3, 4)}) == {"image": (0, 1, 4),
                                                                               "audio": (2, 3, 4)}


def test_ids_that_do_not_name_the_experts_are_refused():
    model = build_model(num_experts=4, seed=0)
    with pytest.raises(ValueError, match="must name each"):
        batched_experts_onnx(list(model.experts[:2]), (0, 0), 4)


@pytest.mark.parametrize("layout", ["shared", "modality"])
def test_export_publishes_batched_expert_shards_that_agree_with_the_model(shard_store, request, layout):
    from fedge.cloud.export import build_from_manifest

    version = request.getfixturevalue("modality_version") if layout == "modality" else "v1"
    store = shard_store.store
    man = store.manifest(version)
    model = build_from_manifest(store.version_dir(version), man)
    shards = {f.name: f for f in man.shards() if f.kind == "experts"}
    want = {"experts": None} if layout == "shared" else {"experts.image": "image", "experts.audio": "audio"}
    assert {n: f.modality for n, f in shards.items()} == want
    assert not [f for f in man.files if f.kind == "experts" and f.format != "onnx"]  # weights live once, per expert
    assert man.total_bytes() == sum(f.bytes for f in man.shards() if f.kind != "experts")
    for name, entry in shards.items():
        ids = tuple(model.groups[entry.modality]) if entry.modality else tuple(range(model.num_experts))
        feeds = example_inputs(ids, dim=model.dim, top_k=man.model["top_k"], batch=11, seed=2)
        with torch.no_grad():
            ref = BatchedExperts([model.experts[e] for e in ids], ids, model.num_experts)(**feeds)
        got = _run(str(store.version_dir(version) / entry.file), feeds)
        assert np.max(np.abs(got - ref.numpy())) <= 1e-5
        assert man.extra["agreement"][name] <= 1e-4
