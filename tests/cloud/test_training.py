"""Global MoE training: adapter merge equivalence (unit) and a 2-worker Ray Train run killed mid-way (integration)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.cloud.metrics import read_metrics
from fedge.cloud.training import (
    GlobalTrainer,
    TrainingError,
    fresh_adapters,
    initial_base,
    lora_model,
    merge_adapters,
    recovery_seconds,
    training_dataset,
    training_due,
)
from fedge.common.config import ConfigError, load_config
from fedge.common.lora import adapter_state
from fedge.common.model import build_model, model_kwargs
from fedge.common.synthetic import make_av_dataset
from fedge.common.training import evaluate, forward_batch, to_batch

CFG = load_config(overrides={"precision.image": "fp32", "precision.audio": "fp32"})
MKW = model_kwargs(CFG)
RANK, ALPHA = CFG.model.lora_rank, CFG.model.lora_alpha


def _aggregated_adapters(seed: int = 3) -> dict[str, torch.Tensor]:
    """Non-trivial global adapters, as the aggregator would hold them after some versions."""
    g = torch.Generator().manual_seed(seed)
    ad = adapter_state(lora_model(initial_base(MKW), None, mkw=MKW, rank=RANK, alpha=ALPHA))
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in ad.items()}


def _logits(model: torch.nn.Module, data: dict[str, np.ndarray]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return forward_batch(model, to_batch(data, slice(0, 64))).logits  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- unit
def test_merged_base_with_fresh_adapters_matches_old_base_with_aggregated_adapters() -> None:
    # Prepare: the old base plus aggregated adapters, and a mixed-modality batch
    base, ad = initial_base(MKW), _aggregated_adapters()
    data = make_av_dataset(64, seed=5)
    data["mask"][::3, 0] = False  # some samples lack the image
    data["mask"][1::3, 1] = False  # some lack the audio
    before = _logits(lora_model(base, ad, mkw=MKW, rank=RANK, alpha=ALPHA), data)
    # Execute: merge, reset adapters against the merged base
    merged = merge_adapters(base, ad, mkw=MKW, rank=RANK, alpha=ALPHA)
    fresh = fresh_adapters(merged, mkw=MKW, rank=RANK, alpha=ALPHA)
    after = _logits(lora_model(merged, fresh, mkw=MKW, rank=RANK, alpha=ALPHA), data)
    plain = build_model(**MKW)
    plain.load_state_dict(merged)
    # Assert: identical function, adapters really reset (B = 0), the plain merged model agrees too
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(plain, data), before, atol=1e-5, rtol=1e-5)
    assert all(float(v.abs().max()) == 0.0 for k, v in fresh.items() if ".lora_B" in k)
    assert not torch.allclose(merged["experts.0.fc1.weight"], base["experts.0.fc1.weight"])


@pytest.mark.parametrize("scope", ["partial", "full"])
def test_merging_a_wider_scope_keeps_the_function_and_hands_back_that_scope_fresh(scope: str) -> None:
    from fedge.common.scope import scope_keys, trainable_state

    g = torch.Generator().manual_seed(4)
    base = initial_base(MKW)
    start = trainable_state(lora_model(base, None, mkw=MKW, rank=RANK, alpha=ALPHA), scope)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    data = make_av_dataset(32, seed=6)
    before = _logits(lora_model(base, state, mkw=MKW, rank=RANK, alpha=ALPHA, scope=scope), data)
    merged = merge_adapters(base, state, mkw=MKW, rank=RANK, alpha=ALPHA, scope=scope)
    fresh = fresh_adapters(merged, mkw=MKW, rank=RANK, alpha=ALPHA, scope=scope)
    after = _logits(lora_model(merged, fresh, mkw=MKW, rank=RANK, alpha=ALPHA, scope=scope), data)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert set(fresh) == scope_keys(lora_model(merged, None, mkw=MKW, rank=RANK, alpha=ALPHA), scope)
    with pytest.raises(TrainingError, match="scope"):  # the adapters alone are not a state of this scope
        lora_model(base, adapter_state(lora_model(base, None, mkw=MKW, rank=RANK, alpha=ALPHA)), mkw=MKW,
                   rank=RANK, alpha=ALPHA, scope=scope)


def test_merge_rejects_adapters_that_do_not_fit_the_model() -> None:
    base, ad = initial_base(MKW), _aggregated_adapters()
    bad_shape = dict(ad)
    bad_shape["head.fc2.lora_B"] = torch.zeros(3, 3)
    with pytest.raises(TrainingError, match="does not fit"):
        merge_adapters(base, bad_shape, mkw=MKW, rank=RANK, alpha=ALPHA)
    missing = dict(ad)
    missing.pop("router.gate.weight")
    with pytest.raises(TrainingError, match="does not fit"):
        merge_adapters(base, missing, mkw=MKW, rank=RANK, alpha=ALPHA)
    nan = dict(ad)
    nan["router.gate.bias"] = torch.full_like(ad["router.gate.bias"], float("nan"))
    with pytest.raises(TrainingError, match="non-finite"):
        merge_adapters(base, nan, mkw=MKW, rank=RANK, alpha=ALPHA)


def test_merge_accepts_numpy_adapters_as_the_aggregator_keeps_them() -> None:
    base, ad = initial_base(MKW), _aggregated_adapters()
    a = merge_adapters(base, {k: v.numpy() for k, v in ad.items()}, mkw=MKW, rank=RANK, alpha=ALPHA)
    b = merge_adapters(base, ad, mkw=MKW, rank=RANK, alpha=ALPHA)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_due_every_n_aggregated_versions() -> None:
    assert [v for v in range(1, 13) if training_due(v, 4, last_trained_version=(v - 1) // 4 * 4)] == [4, 8, 12]
    assert not training_due(100, 0)  # 0 = only on demand


def test_training_config_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="training.workers"):
        load_config(overrides={"training.workers": 0})
    with pytest.raises(ConfigError, match="training.grad_accum"):
        load_config(overrides={"training.grad_accum": 0})
    with pytest.raises(ConfigError, match="training.nope"):
        load_config(overrides={"training.nope": 1})


def test_recovery_seconds_reads_the_first_resumed_report() -> None:
    recs = [{"restored_from": -1, "first_step_time": 5.0}, {"restored_from": 20, "first_step_time": 112.5}]
    assert recovery_seconds(recs, kill_time=100.0) == pytest.approx(12.5)
    assert recovery_seconds(recs[:1], kill_time=100.0) == float("inf")


# ---------------------------------------------------------------------------------------------- integration
STEPS, EVERY = 80, 10
RECOVERY_TARGET_S = 60.0  # the brief: training again within a minute of a worker dying


@pytest.fixture(scope="module")
def killed_run(ray_session, tmp_path_factory):
    """One 2-worker CPU run on a small data set; rank 0's process is SIGKILLed after the 2nd checkpoint."""
    import ray

    store = tmp_path_factory.mktemp("train")
    data = make_av_dataset(384, seed=11)
    ds = ray.data.from_items([{k: data[k][i] for k in data} for i in range(len(data["label"]))])
    # top-k routing with a capacity factor and gradient accumulation over 2 micro-batches (DDP no_sync)
    run_cfg = load_config(overrides={"precision.image": "fp32", "precision.audio": "fp32",
                                     "model.capacity_factor": 1.0})
    trainer = GlobalTrainer.from_config(
        run_cfg, workers=2, cpus_per_worker=0.5, steps=STEPS, batch_size=16, grad_accum=2, lr=3e-3,
        log_every=5, checkpoint_every=EVERY, max_failures=1, storage_path=store, use_gpu="off")
    run_dir = store / "killed"
    kill: dict[str, float] = {}

    def killer() -> None:  # kill a real worker process once two checkpoints are on disk
        t_end = time.time() + 240
        while time.time() < t_end:
            recs = read_metrics(run_dir / "metrics" / "metrics.jsonl")
            if sum(bool(r.get("checkpoint")) for r in recs) >= 2:
                info = json.loads((run_dir / "workers" / "rank-0.json").read_text())
                kill["step"] = float(recs[-1]["step"])
                kill["time"] = time.time()
                os.kill(int(info["pid"]), signal.SIGKILL)
                return
            time.sleep(0.02)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    base = initial_base(MKW)
    ad = _aggregated_adapters()
    res = trainer.train(base, ad, ds, base_version=7, name="killed")
    th.join(timeout=5)
    return res, kill, data, (base, ad)


@pytest.mark.integration
def test_global_training_loss_falls(killed_run) -> None:
    res, _, data, (base, ad) = killed_run
    assert res.steps == STEPS
    assert res.last_loss() < 0.5 * res.first_loss()
    before = evaluate(lora_model(base, ad, mkw=MKW, rank=RANK, alpha=ALPHA), data)  # type: ignore[arg-type]
    after = evaluate(lora_model(res.base_state, res.adapters, mkw=MKW, rank=RANK, alpha=ALPHA), data)  # type: ignore[arg-type]
    assert after["loss"] < before["loss"]


@pytest.mark.integration
def test_a_checkpoint_is_written_every_n_steps(killed_run) -> None:
    res, _, _, _ = killed_run
    on_disk = sorted(int(p.name.split("-")[1]) for p in res.run_dir.glob("step-*") if p.is_dir())
    assert on_disk == list(range(EVERY, STEPS + 1, EVERY))
    assert all((res.run_dir / f"step-{s:06d}" / "state.pt").is_file() for s in on_disk)


@pytest.mark.integration
def test_killed_worker_resumes_from_last_checkpoint_with_step_counter_intact(killed_run) -> None:
    res, kill, _, _ = killed_run
    assert "time" in kill, "the worker was never killed (the run ended first?)"
    assert len(res.failures) == 1  # Ray Train saw the dead worker and restarted the group
    resumed = [r for r in res.metrics if r["restored_from"] >= 0]
    assert resumed, "no report after the restart"
    start = int(resumed[0]["restored_from"])
    assert start % EVERY == 0 and EVERY <= start <= kill["step"] + EVERY
    # after the restart the step counter continues from the checkpoint, not from 0
    assert [r["step"] for r in resumed] == list(range(start + 5, STEPS + 1, 5))
    recovery = recovery_seconds(res.metrics, kill["time"])
    assert recovery < RECOVERY_TARGET_S
    assert len(res.recovery_s) == 1 and 0 < res.recovery_s[0] <= recovery  # from detection: a lower bound
    print(f"recovery {recovery:.1f}s from kill to training again (target {RECOVERY_TARGET_S}s)")


@pytest.mark.integration
def test_metrics_per_modality_go_to_jsonl_and_tensorboard(killed_run) -> None:
    res, _, _, _ = killed_run
    last = res.metrics[-1]
    for m in ("image", "audio"):
        for key in (f"loss/{m}", f"accuracy/{m}", f"router_entropy/{m}", f"load_max/{m}", f"load/{m}/e0"):
            assert key in last and np.isfinite(last[key])
    assert list(Path(res.run_dir / "metrics").glob("events.out.tfevents.*"))
    assert any(r["dropped_tokens"] > 0 for r in res.metrics)  # capacity factor 1.0 drops overflow tokens
    assert (res.run_dir / "result.json").is_file()


def test_step_batches_are_a_pure_function_of_seed_rank_step() -> None:
    # what makes a resumed run replay exactly the batches the killed one would have seen
    from fedge.cloud.training import _step_batch

    data = make_av_dataset(64, seed=2)
    kw = {"seed": 0, "batch_size": 16, "dropout": 0.5, "device": torch.device("cpu")}
    a, ma = _step_batch(data, rank=0, step=7, micro=0, **kw)
    b, mb = _step_batch(data, rank=0, step=7, micro=0, **kw)
    c, _ = _step_batch(data, rank=1, step=7, micro=0, **kw)
    d, _ = _step_batch(data, rank=0, step=8, micro=0, **kw)
    assert torch.equal(a["label"], b["label"]) and torch.equal(ma, mb) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["image"], d["image"])
    assert mb.any(dim=1).all()  # modality dropout keeps one modality per sample


def test_rebase_args_hand_the_aggregator_numpy_base_and_fresh_adapters(tmp_path) -> None:
    from fedge.cloud.training import TrainResult

    base = initial_base(MKW)
    fresh = fresh_adapters(base, mkw=MKW, rank=RANK, alpha=ALPHA)
    res = TrainResult(base_version=12, base_state=base, adapters=fresh, steps=1, run_dir=tmp_path)
    b, v, a = res.rebase_args()
    assert v == 12 and set(b) == set(base) and set(a) == set(fresh)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in [*b.values(), *a.values()])


# ---------------------------------------------------------------------------------------------- CLI bad input
def _cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from fedge.cloud.cli.train import train_command

    app = typer.Typer()
    app.command()(train_command)
    return CliRunner().invoke(app, args)


def test_cli_rejects_bad_input_with_one_line_before_starting_ray(tmp_path) -> None:
    from safetensors.torch import save_file

    r = _cli(["--set", "training.workers=0"])
    assert r.exit_code == 2 and "training.workers" in r.output
    r = _cli(["--base", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "base file not found" in r.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    r = _cli(["--adapters", str(junk)])
    assert r.exit_code == 2 and "cannot read state file" in r.output
    bad = dict(_aggregated_adapters())
    bad["head.fc2.lora_B"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    r = _cli(["--adapters", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2 and "does not fit" in r.output
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    r = _cli(["--adapters", str(tmp_path / "bad.npz")])
    assert r.exit_code == 2 and "does not fit" in r.output


def test_training_data_path_is_read_and_bad_files_get_one_clear_error(tmp_path, ray_session) -> None:
    cfg = load_config()
    d = make_av_dataset(24, seed=3, num_classes=cfg.model.num_classes, image_size=cfg.model.image_size,
                        n_mels=cfg.model.n_mels, frames=cfg.model.audio_frames)
    good = tmp_path / "cloud.npz"
    np.savez(good, **d)
    ds = training_dataset(load_config(overrides={"training.data_path": str(good)}))
    rows = ds.take_all()
    assert len(rows) == 24 and sorted(rows[0]) == ["audio", "image", "label", "mask", "quality"]
    np.savez(tmp_path / "partial.npz", image=d["image"], label=d["label"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, what in (("partial.npz", "lacks the array(s) audio, mask, quality"), ("junk.npz", "not a readable"),
                       ("missing.npz", "not found")):
        with pytest.raises(TrainingError, match=r"training\.data_path") as e:
            training_dataset(load_config(overrides={"training.data_path": str(tmp_path / name)}))
        assert what in str(e.value) and "\n" not in str(e.value)


def test_training_data_path_reads_a_sample_store_and_refuses_labels_outside_the_model(tmp_path, ray_session) -> None:
    import cv2

    from fedge.edge.store import SampleStore

    jpeg = cv2.imencode(".jpg", np.full((40, 40, 3), 90, np.uint8))[1].tobytes()
    with SampleStore(tmp_path / "store") as st:
        for i in range(5):
            st.put(image_jpeg=jpeg, audio=np.zeros((40, 32), np.float32), label=i % 3, source="cam.mp4",
                   stream_time=float(i))
        st.put(image_jpeg=jpeg, label=None)  # unlabelled: not training data
    rows = training_dataset(load_config(overrides={"training.data_path": str(tmp_path / "store")})).take_all()
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1, 2]
    with pytest.raises(TrainingError, match=r"store.*sample 3 \(cam\.mp4 at 2\.00 s\) has label 2"):
        training_dataset(load_config(overrides={"training.data_path": str(tmp_path / "store"),
                                                "model.num_classes": 2}))


def test_cli_data_that_is_neither_store_nor_npz_fails_before_ray(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing.npz", tmp_path / "empty"):
        r = _cli(["--data", str(bad)])
        assert r.exit_code == 2 and "neither a sample store directory nor an NPZ" in r.output
        assert len(r.output.strip().splitlines()) == 1
