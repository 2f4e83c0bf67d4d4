"""`fedge simulate run` on the user's own stores: nothing rendered, the given eval set used as given, the report
names the data, `data.missing_*` applied to store data, and every way it cannot work is one line before Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.common.config import load_config
from fedge.common.synthetic import make_av_dataset
from fedge.edge.store import SampleStore

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "simulations" / "scenarios" / "tiny.toml"


def _store(path: Path, n: int, *, seed: int, modalities: tuple[str, ...] = ("image", "audio"),
           split: str = "train", num_classes: int = 10) -> Path:
    """A store of ``n`` labelled samples of the synthetic task, written as an ingest would (JPEG + log-mel)."""
    d = make_av_dataset(n, seed=seed, num_classes=num_classes, image_noise=0.05, audio_snr_db=20.0)
    rows = []
    for i in range(n):
        bgr = (d["image"][i].transpose(1, 2, 0)[:, :, ::-1] * 255).round().astype(np.uint8)
        jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        rows.append({"image_jpeg": jpeg if "image" in modalities else None,
                     "audio": d["audio"][i] if "audio" in modalities else None, "label": int(d["label"][i]),
                     "split": split, "source": f"rec-{seed}.mp4", "stream_time": float(i)})
    with SampleStore(path) as st:
        st.put_many(rows)
    return path


def _given(tmp_path: Path, devices: int = 2, **kw) -> Path:
    root = tmp_path / "stores"
    for i in range(devices):
        _store(root / f"device-{i}", 24, seed=10 + i, **kw)
    return root


def _run(*sets: str):
    args = ["simulate", "run", str(TINY), "--quiet", "--set", "data.source=store", "--set", "simulation.devices=2"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(build_app(), args)


@pytest.mark.parametrize("case", ["missing-device", "label-outside", "missing-eval", "nothing-to-train",
                                  "store-without-root", "root-without-store"])
def test_given_data_that_cannot_work_fails_in_one_line_before_ray(case: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEDGE_SIM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "stores"
    sets = [f"data.store_root={root}"]
    if case == "missing-device":
        _store(root / "device-0", 8, seed=1)
        want = "no store device-1"
    elif case == "label-outside":
        _given(tmp_path)
        sets.append("model.num_classes=3")
        want = "outside the model's classes"
    elif case == "missing-eval":
        _given(tmp_path)
        sets.append(f"data.eval_path={tmp_path / 'nowhere.npz'}")
        want = "data.eval_path"
    elif case == "store-without-root":  # generated data renders no stores: the devices would have none
        sets = ["simulation.dataset=synthetic"]
        want = "data.source = 'store' needs data.store_root"
    elif case == "root-without-store":  # stores named but generated data trained on would go unnoticed
        _given(tmp_path)
        sets.append("data.source=synthetic")
        want = "set data.source = 'store'"
    else:  # the device data.missing_image takes the camera of holds image-only samples
        _given(tmp_path, modalities=("image",))
        sets.append("data.missing_image=0.5")
        want = "has nothing to train on"
    r = _run(*sets)
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and want in r.output, r.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing rendered
    if case == "label-outside":
        assert str(root / "device-0") in r.output and "rec-10.mp4" in r.output


def test_missing_modalities_apply_to_store_devices_as_to_rendered_ones(tmp_path: Path):
    from fedge.edge.data import local_data, simulated_modalities
    from fedge.edge.node_config import NodeConfig

    root = _given(tmp_path, devices=4)
    cfg = load_config(overrides={"data.source": "store", "data.store_root": str(root), "data.missing_image": 0.25,
                                 "data.missing_audio": 0.25})
    has = [simulated_modalities(cfg, NodeConfig(partition_id=i, num_partitions=4)) for i in range(4)]
    assert sorted(has) == [("audio",), ("image",), ("image", "audio"), ("image", "audio")]
    for i, mods in enumerate(has):
        mask = local_data(cfg, NodeConfig(partition_id=i, num_partitions=4))["mask"]
        assert mask[:, 0].any() == ("image" in mods) and mask[:, 1].any() == ("audio" in mods)
        assert len(mask) == 24  # every sample keeps the modality the device has


def test_device_store_label_outside_classes_is_an_error_not_a_silent_drop(tmp_path: Path):
    from fedge.common.dataset import DataError
    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig

    root = _given(tmp_path)
    cfg = load_config(overrides={"data.source": "store", "data.store_root": str(root), "model.num_classes": 4})
    with pytest.raises(DataError, match=r"device-0.*outside the model's classes 0\.\.3"):
        local_data(cfg, NodeConfig(partition_id=0, num_partitions=2))


def _simulate(*args: object, cache: Path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "fedge.common.cli", "simulate", "run", str(TINY), *map(str, args),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.integration
def test_simulate_on_given_stores_renders_nothing_and_the_report_names_the_data(tmp_path: Path):
    root = _given(tmp_path)
    held = _store(tmp_path / "heldout", 30, seed=99, split="test")
    np.savez(tmp_path / "cloud.npz", **make_av_dataset(40, seed=7, image_noise=0.05, audio_snr_db=20.0))
    cache = tmp_path / "cache"
    sets = ["data.source=store", f"data.store_root={root}", f"data.eval_path={held}", "simulation.devices=2",
            f"simulation.pretrain_data={tmp_path / 'cloud.npz'}", "simulation.pretrain_steps=20",
            "aggregation.versions=1", "aggregation.concurrency=2", "train.local_steps=2"]
    r = _simulate("--out", tmp_path / "run", *[a for s in sets for a in ("--set", s)], cache=cache)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1] and 0.0 <= recs[0]["accuracy"] <= 1.0
    cfg = load_config(toml_path=run / "config.toml")
    assert cfg.data.store_root == str(root) and cfg.data.eval_path == str(held)  # as given
    assert Path(cfg.model.base_path).parent.name.startswith("pretrain-")  # pretrained on the named NPZ
    assert sorted(p.name for p in cache.iterdir()) == [Path(cfg.model.base_path).parent.name]  # nothing rendered
    report = (run / "report.md").read_text()
    assert f"| training data | stores {root.resolve()}/device-0..1 |" in report
    assert f"| evaluation data | store {held.resolve()} (30 labelled samples) |" in report
    assert f"| pretraining data | NPZ {(tmp_path / 'cloud.npz').resolve()} |" in report
    assert "synthetic" not in report and "AV digits" not in report



def test_prepare_for_flwr_run_checks_given_stores_and_renders_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEDGE_SIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _given(tmp_path)
    held = _store(tmp_path / "heldout", 6, seed=5, split="test")
    r = CliRunner().invoke(build_app(), [
        "simulate", "prepare", str(TINY), "--out", "run", "--set", "data.source=store", "--set",
        "data.store_root=stores", "--set", "data.eval_path=heldout", "--set", "simulation.devices=2", "--set",
        "simulation.pretrain_steps=0"])
    assert r.exit_code == 0, r.output
    cfg = load_config(toml_path=tmp_path / "run" / "config.toml")
    assert cfg.data.store_root == str((tmp_path / "stores").resolve())  # relative paths made absolute
    assert cfg.data.eval_path == str(held.resolve())
    assert not (tmp_path / "cache").exists()


def test_report_names_rendered_generated_and_given_data():
    from fedge.simulations.report import data_names

    rendered = data_names({"simulation.dataset": "avdigits", "data.partition": "speaker"},
                          {"eval": "NPZ /c/heldout.npz", "eval_samples": 60, "cloud_samples": 100})
    assert rendered == {"training": "AV digits rendered and ingested per device, partition speaker",
                        "evaluation": "NPZ /c/heldout.npz (60 labelled samples)",
                        "pretraining": "the cloud's rendered share (100 samples)"}
    given = data_names({"simulation.dataset": "avdigits"}, {"train": "stores /s/device-0..1",
                                                            "eval": "none (data.eval_path is empty: no accuracy)"})
    assert given == {"training": "stores /s/device-0..1", "evaluation": "none (data.eval_path is empty: no accuracy)"}
    assert data_names({"simulation.dataset": "synthetic", "data.partition": "iid"}, {})["training"] == \
        "synthetic, generated per device, partition iid"
