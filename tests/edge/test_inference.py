"""ShardedRunner (onnxruntime, shard by shard) reproduces the torch model; the MoE combine kernel; the CLI."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.common.model import build_model
from fedge.edge.inference import ShardedRunner, combine_experts
from fedge.edge.shards import ShardCache


def test_combine_experts_matches_the_torch_moe_route():
    model = build_model(seed=2).eval()
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(9, model.dim, generator=g), torch.rand(9, generator=g)
    with torch.no_grad():
        want, _, _, idx, _ = model.route(x, q)
        from fedge.common.model import top_k_gating

        _, idx, gates = top_k_gating(model.router(x, q), model.top_k)
        outputs, rows = {}, {}
        for e in idx.unique().tolist():
            tok = (idx == e).any(dim=1).nonzero().squeeze(1)
            outputs[e], rows[e] = model.experts[e](x[tok]).numpy(), tok.numpy()
    got = combine_experts(x.numpy(), idx.numpy(), gates.numpy(), outputs, rows)
    assert np.allclose(got, want.numpy(), atol=1e-6)


def _cache(srv, tmp_path, modalities, **kw):
    return ShardCache(srv.url, tmp_path / "cache", public_key=srv.store.public_pem, modalities=modalities,
                      token=srv.token, device=srv.device, ca_file=srv.ca_file, **kw)


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["shared", "modality"])  # modality: expert_affinity='modality' (ORT mask)
@pytest.mark.parametrize("given", [("image", "audio"), ("image",), ("audio",)])
def test_sharded_runner_reproduces_the_model(shard_server, request, tmp_path, given, layout):
    from fedge.cloud.export import build_from_manifest

    version = request.getfixturevalue("modality_version") if layout == "modality" else "latest"
    runner = ShardedRunner(_cache(shard_server, tmp_path, ("image", "audio"), version=version))
    store = shard_server.store.store
    model = build_from_manifest(store.version_dir(runner.manifest.version), runner.manifest)
    g = torch.Generator().manual_seed(4)
    img, aud = torch.rand(5, 3, 32, 32, generator=g), torch.randn(5, 40, 32, generator=g) * 10 - 40
    q = torch.rand(5, 2, generator=g)
    kw = {"image": img if "image" in given else None, "audio": aud if "audio" in given else None}
    with torch.no_grad():
        want = model(**kw, quality=q)
    got = runner.predict(**{k: (v.numpy() if v is not None else None) for k, v in kw.items()}, quality=q.numpy())
    assert np.max(np.abs(got.logits - want.logits.numpy())) <= 1e-4
    assert np.allclose(got.fusion_weights, want.fusion_weights.numpy(), atol=1e-5)
    assert (got.predictions == want.logits.argmax(1).numpy()).all()
    # the same experts as torch, per sample; with modality affinity all inside the given modalities' groups
    assert got.experts == [sorted(set(r)) for r in want.topk_idx.reshape(5, -1).tolist()]
    reachable = set().union(*(model.groups[m] for m in given))
    assert {e for es in got.experts for e in es} <= reachable


@pytest.mark.integration
def test_runner_rejects_bad_input_with_a_clear_error(shard_server, tmp_path):
    runner = ShardedRunner(_cache(shard_server, tmp_path, ("audio",)))
    with pytest.raises(ValueError, match="no image modality"):
        runner.predict(image=np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        runner.predict(audio=np.zeros((1, 40, 7), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        runner.predict(audio=np.full((1, 40, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="at least one"):
        runner.predict()


@pytest.mark.integration
def test_edge_predict_command_prints_one_line_per_window(shard_server, tmp_path):
    audio = (np.random.default_rng(0).standard_normal((3, 40, 32)) * 10 - 40).astype(np.float32)
    np.save(tmp_path / "mel.npy", audio)
    args = ["edge", "predict", "--shards", shard_server.url, "--audio", str(tmp_path / "mel.npy"),
            "--public-key", str(shard_server.store.public_pem), "--cache-dir", str(tmp_path / "c"),
            "--ca-file", str(shard_server.ca_file), "--device", shard_server.device, "--token", shard_server.token]
    r = CliRunner().invoke(build_app(), args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("window ")]
    assert len(lines) == 3 and "class" in lines[0]
    assert "image" not in r.output
    args[args.index("--cache-dir") + 1] = str(tmp_path / "fresh")  # an empty cache, so it must download
    r = CliRunner().invoke(build_app(), args[:-4])  # without a token
    assert r.exit_code == 1 and "refused" in r.output


def _write_clip(tmp_path):
    """A 3 s, 10 fps video with two scenes and a 3 s 16 kHz tone with a change at 1.5 s."""
    import wave

    import cv2

    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    rng = np.random.default_rng(0)
    for i in range(30):
        base = np.full((64, 64, 3), (40, 160, 90) if i < 15 else (200, 30, 30), np.uint8)
        w.write(np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8))
    w.release()
    t = np.arange(3 * 16000) / 16000
    y = np.where(t < 1.5, np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1200 * t)) * 0.3
    wav = tmp_path / "clip.wav"
    with wave.open(str(wav), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((y * 32767).astype("<i2").tobytes())
    return path, wav


@pytest.mark.integration
def test_edge_predict_runs_on_a_real_video_and_audio_file(shard_server, tmp_path):
    video, wav = _write_clip(tmp_path)
    common = ["--shards", shard_server.url, "--public-key", str(shard_server.store.public_pem),
              "--cache-dir", str(tmp_path / "c"), "--ca-file", str(shard_server.ca_file),
              "--device", shard_server.device, "--token", shard_server.token]
    r = CliRunner().invoke(build_app(), ["edge", "predict", "--video", str(video), "--audio", str(wav), *common])
    assert r.exit_code == 0, r.output
    frames = [ln for ln in r.output.splitlines() if ln.startswith("keyframe ")]
    assert len(frames) >= 2  # one per scene at least, each paired with the audio window at its time
    r = CliRunner().invoke(build_app(), ["edge", "predict", "--audio", str(wav), *common])
    assert r.exit_code == 0, r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("window ")]) == 3  # one per second


@pytest.mark.integration
@pytest.mark.parametrize("layout,given", [("shared", ("image", "audio")), ("modality", ("image", "audio")),
                                          ("modality", ("audio",))])
def test_batched_experts_runner_reproduces_the_model_in_one_call_per_group(shard_server, request, tmp_path,
                                                                           layout, given):
    from fedge.cloud.export import build_from_manifest

    version = request.getfixturevalue("modality_version") if layout == "modality" else "latest"
    cache = _cache(shard_server, tmp_path, given, version=version)
    runner = ShardedRunner(cache, batched_experts=True)
    model = build_from_manifest(shard_server.store.store.version_dir(runner.manifest.version), runner.manifest)
    g = torch.Generator().manual_seed(5)
    img, aud = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 40, 32, generator=g) * 10 - 40
    kw = {"image": img if "image" in given else None, "audio": aud if "audio" in given else None}
    with torch.no_grad():
        want = model(**kw)
    got = runner.predict(**{k: (v.numpy() if v is not None else None) for k, v in kw.items()})
    assert np.max(np.abs(got.logits - want.logits.numpy())) <= 1e-4
    assert got.experts == [sorted(set(r)) for r in want.topk_idx.reshape(4, -1).tolist()]
    batched = {"experts"} if layout == "shared" else {f"experts.{m}" for m in given}
    cached = set(cache.cached_files())
    fetched = {f.name for f in runner.manifest.shards() if f"{f.sha256}.onnx" in cached}
    assert batched <= fetched and not any(n.startswith("expert.") for n in fetched)  # no per-expert shard
