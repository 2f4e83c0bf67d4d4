import pytest

from fedge.common.config import ConfigError, FedgeConfig, load_config, parse_overrides


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    cfg = load_config()
    path = cfg.save(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert load_config(toml_path=path) == cfg


def test_precedence_run_config_then_toml_then_overrides(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[aggregation]\nbuffer_size = 7\nmode = "sync"\n[precision]\nimage = "fp16"\n')
    cfg = load_config(
        run_config={"aggregation.buffer_size": 3, "aggregation.concurrency": 5, "modal_types": "audio"},
        toml_path=f,
        overrides=parse_overrides(["aggregation.mode=async", "communication.topk_ratio=0.1"]),
    )
    assert cfg.aggregation.buffer_size == 7 and cfg.aggregation.concurrency == 5
    assert cfg.aggregation.mode == "async" and cfg.communication.topk_ratio == 0.1
    assert cfg.precision.image == "fp16" and cfg.modal_types == ("audio",)


@pytest.mark.parametrize("flat,key", [
    ({"aggregation.bufer_size": 3}, "aggregation.bufer_size"),
    ({"nonsense": 1}, "nonsense"),
    ({"precision.image": "fp8"}, "precision.image"),
    ({"communication.quant_bits": 5}, "communication.quant_bits"),
    ({"communication.topk_ratio": "lots"}, "communication.topk_ratio"),
    ({"aggregation.staleness": "cubic"}, "aggregation.staleness"),
    ({"aggregation.mode": "eventually"}, "aggregation.mode"),
    ({"model.top_k": 9}, "model.top_k"),
    ({"modal_types": "image,smell"}, "modal_types"),
    ({"fault_tolerance.checkpoint_every": 0}, "fault_tolerance.checkpoint_every"),
    ({"train.lr": -1}, "train.lr"),
    ({"aggregation.versions": True}, "aggregation.versions"),
    ({"data.eval_voices": "martian"}, "data.eval_voices"),
])
def test_bad_keys_and_values_fail_naming_the_key(flat, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(run_config=flat)


def test_missing_and_invalid_toml_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(toml_path=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregation\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(toml_path=bad)


def test_flat_form_is_flower_compatible():
    flat = FedgeConfig().to_flat()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["modal_types"] == "image,audio"
    assert load_config(run_config=flat) == FedgeConfig()


def test_pyproject_flower_config_lists_every_key_with_the_config_defaults():
    """`flwr run --run-config k=v` only accepts keys present in [tool.flwr.app.config]: list them all, and
    `flwr run .` without overrides must run what the config's defaults say (one source of defaults)."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    py = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    flat = flatten_dict(py["tool"]["flwr"]["app"]["config"])
    cfg = load_config(run_config=flat)  # valid
    defaults = FedgeConfig().to_flat()
    assert set(flat) == set(defaults), "pyproject config and common/config.py list different keys"
    assert cfg.to_flat() == flat
    differ = {k: (flat[k], defaults[k]) for k in defaults if flat[k] != defaults[k]}
    assert not differ, f"[tool.flwr.app.config] must hold common/config.py's defaults (pyproject, config): {differ}"


@pytest.mark.parametrize("flat,key", [
    ({"model.expert_affinity": "speaker"}, "model.expert_affinity"),
    ({"model.expert_affinity": "modality", "model.top_k": 3}, "model.top_k"),  # groups of 2 experts
    ({"model.expert_affinity": "modality", "model.shared_experts": 1}, "model.shared_experts"),  # 3 private
    ({"model.expert_affinity": "modality", "model.shared_experts": -2}, "model.shared_experts"),
    ({"model.shared_experts": 2}, "model.shared_experts"),  # only meaningful with 'modality'
])
def test_expert_affinity_layouts_are_validated_naming_the_key(flat, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(run_config=flat)


def test_modality_affinity_config_reaches_the_model():
    from fedge.common.model import build_model, model_kwargs

    cfg = load_config(run_config={"model.expert_affinity": "modality", "model.num_experts": 6,
                                  "model.shared_experts": 2, "model.top_k": 4})
    model = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    assert model.expert_affinity == "modality" and model.groups["audio"] == (2, 3, 4, 5)
    assert FedgeConfig().model.expert_affinity == "shared" and FedgeConfig().model.shared_experts == 0


def test_a_removed_key_in_an_old_config_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="fault_tolerance.recovery_time_s.*no longer used"):
        cfg = load_config(run_config={"fault_tolerance.recovery_time_s": 60.0, "fault_tolerance.max_failures": 2})
    assert cfg.fault_tolerance.max_failures == 2
