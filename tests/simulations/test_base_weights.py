"""The published base (``model.base_path``): both apps load it; a missing or mismatched file fails in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedge.common.base_weights import BaseWeightsError, load_base_file, save_base
from fedge.common.config import load_config
from fedge.common.lora import base_state
from fedge.common.model import build_model, model_kwargs

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"model.dim": 16, "model.expert_hidden": 32, "model.num_experts": 2, "model.top_k": 1}


def _saved_base(path, **over):
    cfg = load_config(overrides={**SMALL, **over})
    torch.manual_seed(123)
    m = build_model(**model_kwargs(cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))  # anything but the seed's init
    save_base(m, path)
    return base_state(m)


def test_server_and_client_models_load_the_same_published_base(tmp_path):
    from fedge.cloud.builders import global_model
    from fedge.edge.client_app import get_model

    want = _saved_base(tmp_path / "base.safetensors")
    cfg = load_config(overrides={**SMALL, "model.base_path": str(tmp_path / "base.safetensors")})
    for model in (global_model(cfg), get_model(cfg)):
        got = base_state(model)
        assert set(got) == set(want)
        assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
    seed_only = base_state(global_model(load_config(overrides=SMALL)))
    assert not all(torch.equal(seed_only[k], want[k]) for k in want)


def test_missing_base_file_fails_clearly(tmp_path):
    from fedge.cloud.builders import global_model
    from fedge.edge.client_app import get_model

    cfg = load_config(overrides={**SMALL, "model.base_path": str(tmp_path / "nope.safetensors")})
    for build in (global_model, get_model):
        with pytest.raises(BaseWeightsError, match=r"model.base_path: .*nope.safetensors not found"):
            build(cfg)


def test_base_of_another_model_shape_fails_clearly(tmp_path):
    _saved_base(tmp_path / "base.safetensors", **{"model.dim": 8})
    cfg = load_config(overrides=SMALL)
    m = build_model(**model_kwargs(cfg))
    with pytest.raises(BaseWeightsError, match="has shape .* another model config"):
        load_base_file(m, tmp_path / "base.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BaseWeightsError, match="not a safetensors file"):
        load_base_file(m, tmp_path / "junk.safetensors")


def test_simulate_with_a_missing_base_file_fails_with_one_line(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-m", "fedge.common.cli", "simulate", "run",
                        str(ROOT / "simulations" / "scenarios" / "tiny.toml"), "--out", str(tmp_path / "run"),
                        "--set", f"model.base_path={tmp_path / 'missing.safetensors'}", "--quiet"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "missing.safetensors not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()  # nothing prepared for a run that cannot start


def test_pretraining_is_off_with_zero_steps_or_a_named_base():
    from fedge.simulations.prepare import data_key, pretrains

    tiny = ROOT / "simulations" / "scenarios" / "tiny.toml"
    assert pretrains(load_config(toml_path=tiny)) and "cloud" in data_key(load_config(toml_path=tiny))
    for over in ({"simulation.pretrain_steps": 0}, {"model.base_path": "/some/base.safetensors"}):
        cfg = load_config(toml_path=tiny, overrides=over)
        assert not pretrains(cfg) and "cloud" not in data_key(cfg)
