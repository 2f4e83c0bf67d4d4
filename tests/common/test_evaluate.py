"""`fedge evaluate`: accuracy of a model whose answers are known, overall, per modality subset and per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedge.common.base_weights import save_base
from fedge.common.cli import build_app
from fedge.common.config import load_config
from fedge.common.evaluation import model_with
from fedge.common.lora import adapter_state
from fedge.common.model import build_model, model_kwargs

SMALL = {"model.dim": 16, "model.num_experts": 2, "model.top_k": 1, "model.expert_hidden": 32,
         "model.num_classes": 4, "model.image_size": 16, "model.n_mels": 16, "model.audio_frames": 8}
SETS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


def _cfg(**extra):
    return load_config(overrides={**SMALL, **extra})


def _constant_base(path: Path, cls: int) -> Path:
    """A base whose head ignores its input and always answers ``cls``."""
    m = build_model(**model_kwargs(_cfg()))
    with torch.no_grad():
        m.head.fc2.weight.zero_()
        m.head.fc2.bias.zero_()
        m.head.fc2.bias[cls] = 10.0
    return save_base(m, path)


def _data(path: Path) -> Path:
    """12 samples: labels 0,0,0,1,1,1,2,2,2,2,3,3 with modalities both / image / audio in turn."""
    label = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    n = len(label)
    mask = np.array([[True, True], [True, False], [False, True]] * 4)
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.random((n, 3, 16, 16), dtype=np.float32),
             audio=rng.normal(size=(n, 16, 8)).astype(np.float32), label=label, mask=mask,
             quality=np.ones((n, 2), np.float32))
    return path


def _evaluate(*args: object):
    return CliRunner().invoke(build_app(), ["evaluate", *map(str, args)])


def test_constant_predictor_scores_the_share_of_its_class_everywhere(tmp_path: Path):
    base = _constant_base(tmp_path / "base.safetensors", 2)
    r = _evaluate(base, "--data", _data(tmp_path / "d.npz"), "--json", *SETS)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["n"] == 12
    assert rep["accuracy"] == pytest.approx(4 / 12)
    # samples 6..9 are class 2; their modalities: 6 both, 7 image, 8 audio, 9 both
    assert rep["image+audio"] == pytest.approx(2 / 4)  # both-modality samples: 0, 3, 6, 9
    assert rep["image"] == pytest.approx(3 / 8)  # image-carrying: 0,1,3,4,6,7,9,10
    assert rep["audio"] == pytest.approx(3 / 8)  # audio-carrying: 0,2,3,5,6,8,9,11
    assert [c["accuracy"] for c in rep["per_class"]] == [0.0, 0.0, 1.0, 0.0]
    assert [c["n"] for c in rep["per_class"]] == [3, 3, 4, 2]
    assert rep["confusion"] == [[0, 0, 3, 0], [0, 0, 3, 0], [0, 0, 4, 0], [0, 0, 2, 0]]


def test_run_dir_uses_final_adapters_and_the_newest_base_global_training_saved(tmp_path: Path):
    run = tmp_path / "run"
    cfg = _cfg(**{"model.base_path": str(_constant_base(tmp_path / "b2.safetensors", 2))})
    cfg.save(run)
    np.savez(run / "global_adapters.npz", **{k: v.numpy() for k, v in adapter_state(model_with(cfg, None)).items()})
    data = _data(tmp_path / "d.npz")
    rep = json.loads(_evaluate(run, "--data", data, "--json").output)
    assert rep["accuracy"] == pytest.approx(4 / 12)  # the config's base: always 2
    _constant_base(run / "bases" / "base-000003.safetensors", 3)
    rep = json.loads(_evaluate(run, "--data", data, "--json").output)
    assert rep["accuracy"] == pytest.approx(2 / 12)  # the newer base saved by global training: always 3
    assert rep["model"].startswith("run ") and rep["data"].startswith("NPZ ")


def test_adapters_file_is_evaluated_on_the_base_named_by_base(tmp_path: Path):
    cfg = _cfg()
    adapters = tmp_path / "global_adapters.npz"
    np.savez(adapters, **{k: v.numpy() for k, v in adapter_state(model_with(cfg, None)).items()})
    base = _constant_base(tmp_path / "b.safetensors", 0)
    r = _evaluate(adapters, "--data", _data(tmp_path / "d.npz"), "--base", base, "--json", *SETS)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["accuracy"] == pytest.approx(3 / 12) and rep["model"].startswith("adapters ")


def test_table_output_names_subsets_and_prints_the_confusion_matrix(tmp_path: Path):
    base = _constant_base(tmp_path / "base.safetensors", 0)
    r = _evaluate(base, "--data", _data(tmp_path / "d.npz"), *SETS)
    assert r.exit_code == 0, r.output
    assert "own modalities (fused)" in r.output and "image only" in r.output and "audio only" in r.output
    assert "confusion matrix" in r.output and "0.2500" in r.output


@pytest.mark.parametrize("case", ["no-model", "no-data", "label-out-of-range", "model-shape", "run-unfinished"])
def test_bad_input_is_one_line(case: str, tmp_path: Path):
    data = _data(tmp_path / "d.npz")
    base = _constant_base(tmp_path / "base.safetensors", 1)
    args: list[object] = [base, "--data", data, *SETS]
    if case == "no-model":
        args[0] = tmp_path / "missing.safetensors"
    elif case == "no-data":
        args[2] = tmp_path / "missing.npz"
    elif case == "label-out-of-range":
        args += ["--set", "model.num_classes=3"]  # label 3 is outside 0..2
    elif case == "model-shape":
        args += ["--set", "model.dim=8"]
    else:
        run = tmp_path / "run"
        _cfg().save(run)
        args = [run, "--data", data]
    r = _evaluate(*args)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    want = {"no-model": "not found", "no-data": "not found", "label-out-of-range": "label 3",
            "model-shape": "do not fit", "run-unfinished": "no final global model"}[case]
    assert want in r.output and r.output.startswith("fedge evaluate: ")
    if case == "label-out-of-range":
        assert str(data) in r.output


@pytest.mark.integration
def test_trained_model_scores_as_the_training_loop_evaluates_it(tmp_path: Path):
    """A small model trained on separable data: the CLI's numbers are the ones fedge.common.training.evaluate gives."""
    from fedge.common.evaluation import fused, only
    from fedge.common.synthetic import make_av_dataset
    from fedge.common.training import evaluate, train_steps

    cfg = _cfg()
    m = build_model(**model_kwargs(cfg))
    kw = {"num_classes": 4, "image_size": 16, "n_mels": 16, "frames": 8, "image_noise": 0.05, "audio_snr_db": 20.0}
    for p in m.parameters():
        p.requires_grad = True
    train_steps(m, make_av_dataset(80, seed=1, **kw), steps=80, batch_size=32, lr=0.01, modality_dropout_p=0.5)
    base = save_base(m, tmp_path / "trained.safetensors")
    test = make_av_dataset(40, seed=2, modalities=("image", "audio"), **kw)
    test["mask"][::3, 0] = False  # some audio-only, some image-only samples
    test["mask"][1::3, 1] = False
    np.savez(tmp_path / "test.npz", **test)
    rep = json.loads(_evaluate(base, "--data", tmp_path / "test.npz", "--json", *SETS).output)
    ref = model_with(cfg, None, base_path=str(base))
    assert rep["accuracy"] == pytest.approx(evaluate(ref, test)["accuracy"])
    assert rep["accuracy"] > 0.8
    assert rep["image+audio"] == pytest.approx(evaluate(ref, fused(test))["accuracy"])
    for mod in ("image", "audio"):
        assert rep[mod] == pytest.approx(evaluate(ref, only(test, mod))["accuracy"])
