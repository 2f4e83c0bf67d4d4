"""The edge ClientApp's TRAIN and EVALUATE handlers, called the way a SuperNode calls them (through its mods)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, Metadata, RecordDict

from fedge.common import codec, wire
from fedge.common.config import ConfigError, load_config
from fedge.common.lora import adapter_state, apply_lora, base_state, is_adapter_key
from fedge.common.model import build_model, model_kwargs
from fedge.edge import node_state
from fedge.edge.client_app import app, get_model
from fedge.edge.data import local_data, restrict_modalities
from fedge.edge.mods import RESIDUAL
from fedge.edge.node_config import NodeConfig, parse_node_config, resolve_device, resolve_precision

# dense, unquantized updates: these tests look at training, not at compression
EXACT = {"communication.compression": "none", "communication.quant_bits": 32, "train.modality_dropout": 0.0,
         "data.samples_per_device": 120}


def _ctx(overrides: dict | None = None, node_config: dict | None = None) -> Context:
    run = load_config(overrides={**EXACT, **(overrides or {})}).to_flat()
    nc = {"partition-id": 0, "num-partitions": 2} if node_config is None else node_config
    return Context(run_id=1, node_id=7, node_config=nc, state=RecordDict(), run_config=run)


def _msg(state: dict[str, np.ndarray], kind: str, version: int = 0, steps: int = 10) -> Message:
    rnd = wire.round_record(version=version, lr=0.01, local_steps=steps, batch_size=32, seed=version)
    md = Metadata(run_id=1, message_id=f"m{version}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                  group_id="", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(content=wire.train_message_content(state, rnd), metadata=md)


def _initial(ctx: Context) -> dict[str, np.ndarray]:
    """The untrained global adapters (a fresh model: the app's cached one holds whatever it loaded last)."""
    cfg = load_config(run_config=ctx.run_config)
    m = apply_lora(build_model(**model_kwargs(cfg)), rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    return {k: v.numpy().copy() for k, v in adapter_state(m).items()}


def test_query_answers_the_partition_id_and_minus_one_on_a_real_device():
    md = Metadata(run_id=1, message_id="q", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=3600, message_type=MessageType.QUERY)
    for nc, want in (({"partition-id": 5, "num-partitions": 8}, 5.0), ({}, -1.0)):
        reply = app(Message(content=wire.query_message_content(), metadata=md), _ctx(node_config=nc))
        assert not reply.has_error(), reply.error
        assert reply.content.metric_records[wire.METRICS][wire.PARTITION_ID] == want


def test_a_message_naming_a_published_base_trains_on_it_and_an_unknown_one_is_a_clear_error(tmp_path):
    """After a global training the server's messages name the published base; devices fetch it and switch."""
    from dataclasses import replace

    from fedge.cloud.publisher import BasePublisher
    from fedge.common.manifest import ManifestError, generate_keypair
    from fedge.edge.client_app import round_config

    store = tmp_path / "models"
    key, _ = generate_keypair(store / ".signing")
    ctx = _ctx({"publish.store": str(store)})
    cfg = load_config(run_config=ctx.run_config)
    new = build_model(**{**model_kwargs(cfg), "seed": 12345})  # a different base than the configured one
    BasePublisher(store, key, image_size=cfg.model.image_size, audio_frames=cfg.model.audio_frames,
                  onnx=False).publish(new, version="base-000002")
    state = _initial(ctx)
    msg = _msg(state, MessageType.TRAIN, version=3, steps=2)
    msg.content.config_records[wire.ROUND][wire.BASE_MODEL] = "base-000002"
    path = round_config(cfg, msg).model.base_path
    assert path.startswith(str(store))
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    used = base_state(get_model(replace(cfg, model=replace(cfg.model, base_path=path))))
    want = base_state(new)
    assert all(torch.equal(used[k].cpu(), want[k]) for k in want if not is_adapter_key(k))

    msg.content.config_records[wire.ROUND][wire.BASE_MODEL] = "base-000009"
    with pytest.raises(ManifestError, match="not in the store"):  # the SuperNode replies with it
        app(msg, ctx)


def test_rounds_of_local_training_lower_the_loss_and_raise_local_accuracy():
    ctx = _ctx()
    state = _initial(ctx)
    ev0 = app(_msg(state, MessageType.EVALUATE), ctx).content.metric_records[wire.METRICS]
    losses = []
    for v in range(4):
        reply = app(_msg(state, MessageType.TRAIN, version=v), ctx)
        assert not reply.has_error(), reply.error
        losses.append(reply.content.metric_records[wire.METRICS][wire.LOSS])
        d = codec.decode(reply.content.config_records[wire.UPDATE][wire.DELTA])
        state = {k: state[k] + d[k] for k in state}
    ev = app(_msg(state, MessageType.EVALUATE), ctx).content.metric_records[wire.METRICS]
    assert losses[-1] < 0.7 * losses[0], losses
    assert ev[wire.ACCURACY] > ev0[wire.ACCURACY] + 0.3, (ev0, ev)
    assert ev["acc-image+audio"] == ev[wire.ACCURACY]  # all local samples carry both modalities


def test_training_changes_adapters_and_never_the_base_weights():
    ctx = _ctx()
    cfg = load_config(run_config=ctx.run_config)
    model = get_model(cfg)
    base0 = {k: v.clone() for k, v in base_state(model).items()}
    state = _initial(ctx)
    reply = app(_msg(state, MessageType.TRAIN, steps=3), ctx)
    d = codec.decode(reply.content.config_records[wire.UPDATE][wire.DELTA])
    assert set(d) == set(state)
    assert sum(float(np.abs(v).sum()) for v in d.values()) > 0
    lora_b = [k for k in d if k.endswith("lora_B")]
    assert lora_b and all(np.abs(d[k]).max() > 0 for k in lora_b[:3])  # B starts at zero and moves
    for k, v in base_state(model).items():
        if not is_adapter_key(k):  # router, fusion gate, modality embeddings are adapter state
            assert torch.equal(v, base0[k]), k


def test_reply_metrics_report_examples_loss_counts_time_and_bytes():
    ctx = _ctx({"communication.compression": "topk", "communication.quant_bits": 8})
    state = _initial(ctx)
    reply = app(_msg(state, MessageType.TRAIN, steps=2, version=5), ctx)
    m = reply.content.metric_records[wire.METRICS]
    assert set(reply.content.keys()) == {wire.UPDATE, wire.METRICS}
    assert reply.content.config_records[wire.UPDATE][wire.BASE_VERSION] == 5
    assert m[wire.NUM_EXAMPLES] == 120 and m["count-image"] == 120 and m["count-audio"] == 120
    assert m[wire.TRAIN_SECONDS] > 0 and np.isfinite(m[wire.LOSS])
    assert m[wire.UPLOAD_BYTES] == len(reply.content.config_records[wire.UPDATE][wire.DELTA])
    assert m[wire.UPLOAD_BYTES] < 0.1 * m[wire.RAW_BYTES]
    assert m[wire.PARTITION_ID] == 0
    assert RESIDUAL in ctx.state


def test_full_scope_trains_every_parameter_for_the_local_epochs_the_round_asks():
    from fedge.common.scope import scope_keys, trainable_state

    ctx = _ctx({"train.scope": "full"})
    cfg = load_config(run_config=ctx.run_config)
    m = apply_lora(build_model(**model_kwargs(cfg)), rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    state = {k: v.numpy().copy() for k, v in trainable_state(m, "full").items()}
    msg = _msg(state, MessageType.TRAIN, steps=1)
    msg.content.config_records[wire.ROUND][wire.LOCAL_EPOCHS] = 0.5
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records[wire.METRICS]
    # 120 samples, batch 32: half an epoch is ceil(60 / 32) = 2 optimizer steps, above the floor of 1
    assert metrics[wire.NUM_EXAMPLES] == 120 and metrics[wire.TRAIN_STEPS] == 2
    d = codec.decode(reply.content.config_records[wire.UPDATE][wire.DELTA])
    assert set(d) == scope_keys(m, "full")
    assert np.abs(d["encoders.image.conv.0.weight"]).max() > 0  # a base weight the adapters scope never moves


@pytest.mark.parametrize("mods", ["audio", "image"])
def test_a_single_modality_device_trains_on_what_it_has(mods):
    ctx = _ctx(node_config={"partition-id": 1, "num-partitions": 2, "modalities": mods})
    state = _initial(ctx)
    reply = app(_msg(state, MessageType.TRAIN, steps=2), ctx)
    assert not reply.has_error(), reply.error
    m = reply.content.metric_records[wire.METRICS]
    other = "image" if mods == "audio" else "audio"
    assert m[f"count-{mods}"] == 120 and m[f"count-{other}"] == 0
    ev = app(_msg(state, MessageType.EVALUATE), ctx).content.metric_records[wire.METRICS]
    assert f"acc-{mods}" in ev and "acc-image+audio" not in ev


def test_deployment_node_persists_its_adapters_and_residual(tmp_path):
    # a device whose state dir is set (as `fedge edge run` does) keeps what it trained across restarts
    ctx = _ctx({"communication.compression": "topk"},
               {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)})
    state = _initial(ctx)
    app(_msg(state, MessageType.TRAIN, steps=2, version=3), ctx)
    adapters, meta = node_state.load_arrays(tmp_path / node_state.ADAPTERS_FILE)
    assert meta == {"base_version": 3} and set(adapters) == set(state)
    assert (tmp_path / node_state.RESIDUAL_FILE).is_file()
    assert len(node_state.read_jsonl(tmp_path / node_state.UPDATES_FILE)) == 1


def test_restrict_modalities_masks_and_drops_empty_samples():
    data = {"label": np.arange(3), "mask": np.array([[1, 1], [1, 0], [0, 1]], bool), "x": np.arange(3) * 10}
    out = restrict_modalities(data, ("audio",))
    assert out["mask"].tolist() == [[False, True], [False, True]]
    assert out["label"].tolist() == [0, 2] and out["x"].tolist() == [0, 20]


def test_local_eval_split_differs_from_training_data():
    cfg = load_config(overrides=EXACT)
    tr, ev = local_data(cfg, NodeConfig(), "train"), local_data(cfg, NodeConfig(), "eval")
    assert len(ev["label"]) == 30 and not np.array_equal(tr["image"][:30], ev["image"])
    with pytest.raises(ValueError, match="split"):
        local_data(cfg, NodeConfig(), "test")


def test_store_source_names_the_missing_store(tmp_path):
    cfg = load_config(overrides={"data.source": "store", "data.store_root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="device-1"):
        local_data(cfg, NodeConfig(partition_id=1, num_partitions=2))


@pytest.mark.parametrize("raw,key", [
    ({"modalities": "image,smell"}, "modalities"),
    ({"profile": "tpu"}, "profile"),
    ({"threads": "many"}, "threads"),
    ({"threads": 0}, "threads"),
    ({"partition-id": 3, "num-partitions": 2}, "partition-id"),
    ({"colour": "red"}, "colour"),
])
def test_bad_node_config_fails_naming_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_node_config(raw)


def test_node_config_round_trips_through_the_supernode_flag():
    from flwr.common.config import parse_config_args

    nc = NodeConfig(device_id="cam-1", store="/var/lib/fedge/store", modalities=("audio",), profile="cpu",
                    threads=2)
    assert parse_node_config(parse_config_args([nc.to_flower()])) == nc


def test_precision_and_device_follow_the_device_profile():
    assert resolve_precision({"image": "fp16", "audio": "bf16"}, "cpu") == {"image": "bf16", "audio": "bf16"}
    assert resolve_precision({"image": "fp16", "audio": "bf16"}, "cuda") == {"image": "fp16", "audio": "bf16"}
    assert resolve_precision({"image": "bf16", "audio": "fp32"}, "cuda", bf16_ok=False) == \
        {"image": "fp16", "audio": "fp32"}
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    with pytest.raises(ConfigError, match="'profile'"):
        resolve_device("gpu", cuda_available=False)


def test_importance_weights_reach_the_loss():
    # a mic-only device with audio weighted 0 has no task loss left (only the router's balance term)
    nc = {"partition-id": 0, "num-partitions": 2, "modalities": "audio"}
    ctx = _ctx({"importance.audio": 0.0}, nc)
    state = _initial(ctx)
    m = app(_msg(state, MessageType.TRAIN, steps=2), ctx).content.metric_records[wire.METRICS]
    m1 = app(_msg(state, MessageType.TRAIN, steps=2), _ctx({}, nc)).content.metric_records[wire.METRICS]
    assert m[wire.LOSS] < 0.05
    assert m1[wire.LOSS] > 1.0


# ------------------------------------------------------------------------------------------ SampleStore source
def _toy_store(path, *, n: int, seed: int, modalities=("image", "audio"), unlabeled: int = 0) -> None:
    """A SampleStore of a separable 4-class task (the generated AV classes), written as a device would."""
    import cv2

    from fedge.common.synthetic import make_av_dataset
    from fedge.edge.store import SampleStore

    d = make_av_dataset(n + unlabeled, seed=seed, num_classes=4, modalities=modalities, image_noise=0.1)
    with SampleStore(path) as st:
        for i in range(n + unlabeled):
            jpeg = None
            if "image" in modalities:
                bgr = (d["image"][i].transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)
                jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            audio = d["audio"][i] if "audio" in modalities else None
            st.put(image_jpeg=jpeg, audio=audio, label=int(d["label"][i]) if i < n else None,
                   split="val" if i % 4 == 3 else "train")


def test_loss_decreases_on_a_separable_toy_store_and_unlabeled_samples_are_skipped(tmp_path):
    _toy_store(tmp_path / "store", n=96, seed=3, unlabeled=8)
    ctx = _ctx(node_config={"store": str(tmp_path / "store"), "device-id": "cam-1"})
    state = _initial(ctx)
    ev0 = app(_msg(state, MessageType.EVALUATE), ctx).content.metric_records[wire.METRICS]
    losses = []
    for v in range(3):
        reply = app(_msg(state, MessageType.TRAIN, version=v), ctx)
        assert not reply.has_error(), reply.error
        m = reply.content.metric_records[wire.METRICS]
        losses.append(m[wire.LOSS])
        d = codec.decode(reply.content.config_records[wire.UPDATE][wire.DELTA])
        state = {k: state[k] + d[k] for k in state}
    assert m[wire.NUM_EXAMPLES] == 72 and m["count-image"] == 72  # 3/4 of the labelled samples; no unlabeled
    assert m[wire.PARTITION_ID] == -1  # a real device has no simulation partition
    assert losses[-1] < 0.6 * losses[0], losses
    ev = app(_msg(state, MessageType.EVALUATE), ctx).content.metric_records[wire.METRICS]
    assert ev[wire.NUM_EXAMPLES] == 24 and ev[wire.ACCURACY] > ev0[wire.ACCURACY] + 0.3, (ev0, ev)
    # the deployment node keeps its state next to its store
    assert (tmp_path / "store" / "agent-state" / node_state.RESIDUAL_FILE).is_file()


def test_mic_only_store_trains_on_audio(tmp_path):
    _toy_store(tmp_path / "store", n=40, seed=4, modalities=("audio",))
    ctx = _ctx(node_config={"store": str(tmp_path / "store"), "modalities": "audio"})
    reply = app(_msg(_initial(ctx), MessageType.TRAIN, steps=2), ctx)
    m = reply.content.metric_records[wire.METRICS]
    assert m["count-audio"] == 30 and m["count-image"] == 0


def test_empty_store_is_a_clear_error(tmp_path):
    # (a SuperNode turns the exception into an error reply, which the server counts)
    (tmp_path / "store").mkdir()
    ctx = _ctx(node_config={"store": str(tmp_path / "store"), "device-id": "cam-9"})
    with pytest.raises(ValueError, match="device cam-9: no training samples"):
        app(_msg(_initial(ctx), MessageType.TRAIN, steps=2), ctx)
