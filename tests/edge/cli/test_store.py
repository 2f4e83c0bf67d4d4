"""`fedge edge store stats / export`: what a store holds, and the NPZ the server and `fedge evaluate` read."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.common.dataset import DataError, load_data
from fedge.edge.store import DB_NAME, SampleStore


def _jpeg(value: int) -> bytes:
    img = np.full((40, 40, 3), value, np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _cli(*args: str):
    return CliRunner().invoke(build_app(), ["edge", "store", *map(str, args)])


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    a = np.zeros((40, 32), np.float32)
    with SampleStore(root) as st:
        st.put(image_jpeg=_jpeg(10), audio=a, label=1, split="train", device_time=1000.0, source="cam.mp4")
        st.put(image_jpeg=_jpeg(20), label=2, split="train", device_time=1001.0)
        st.put(audio=a + 1, label=1, split="test", device_time=1002.5)
        st.put(image_jpeg=_jpeg(30), audio=a, label=None, split="test", device_time=1003.0)
        st.add_rejections({"image:blurry": 3, "audio:silent": 1})
        st.add_rejections({"image:blurry": 2})
    return root


def test_stats_json_counts_splits_labels_modalities_gate_reasons_and_time_span(store: Path):
    r = _cli("stats", store, "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["samples"] == 4
    assert st["splits"] == {"train": 2, "test": 2}
    assert st["labels"] == {"1": 2, "2": 1, "unlabeled": 1}
    assert st["modalities"] == {"image+audio": 2, "image": 1, "audio": 1}
    assert st["by_split"]["test"]["labels"] == {"1": 1, "unlabeled": 1}
    assert st["rejected"] == {"image:blurry": 5, "audio:silent": 1}
    assert st["time_span"] == {"first": 1000.0, "last": 1003.0, "seconds": 3.0}
    assert st["payload_bytes"] > 0


def test_stats_table_names_every_section(store: Path):
    r = _cli("stats", store)
    assert r.exit_code == 0, r.output
    for word in ("samples     4", "labels      1: 2, 2: 1, unlabeled: 1", "image:blurry: 5", "time span"):
        assert word in r.output


def test_store_made_before_gate_counts_gains_the_table(tmp_path: Path):
    root = tmp_path / "old"
    with SampleStore(root) as st:
        st.put(image_jpeg=_jpeg(5), label=0)
    with sqlite3.connect(root / DB_NAME) as conn:  # as a store of an older fedge: no gate table
        conn.execute("DROP TABLE gate_rejections")
    r = _cli("stats", root, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rejected"] == {}


def test_export_writes_the_eval_npz_of_labelled_samples_of_a_split(store: Path, tmp_path: Path):
    out = tmp_path / "test.npz"
    r = _cli("export", store, "--out", out, "--split", "test")
    assert r.exit_code == 0, r.output
    with np.load(out) as z:
        data = {k: z[k] for k in z.files}
    assert sorted(data) == ["audio", "image", "label", "mask", "quality"]
    assert data["label"].tolist() == [1]  # the unlabelled test sample is left out
    assert data["mask"].tolist() == [[False, True]]
    assert data["image"].shape == (1, 3, 32, 32) and data["audio"].shape == (1, 40, 32)
    # the very arrays the loader reads straight from the store
    direct = load_data(store, image_size=32, n_mels=40, frames=32, num_classes=10, split="test")
    for k, v in data.items():
        np.testing.assert_array_equal(v, direct[k])


def test_export_all_splits_matches_the_stores_own_arrays(store: Path, tmp_path: Path):
    out = tmp_path / "all.npz"
    assert _cli("export", store, "--out", out).exit_code == 0
    with SampleStore(store) as st:
        ref = st.load_arrays()
    keep = ref["label"] >= 0
    with np.load(out) as z:
        for k in ref:
            np.testing.assert_array_equal(z[k], ref[k][keep])


def test_export_label_outside_model_classes_fails_naming_store_and_sample(store: Path, tmp_path: Path):
    r = _cli("export", store, "--out", tmp_path / "x.npz", "--set", "model.num_classes=2")
    assert r.exit_code == 2
    msg = r.output.strip()
    assert len(msg.splitlines()) == 1
    assert str(store) in msg and "label 2" in msg and "sample 2" in msg
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("cmd", ["stats", "export"])
def test_not_a_store_is_one_line_and_creates_nothing(cmd: str, tmp_path: Path):
    missing = tmp_path / "nowhere"
    args = [cmd, missing] + (["--out", tmp_path / "o.npz"] if cmd == "export" else [])
    r = _cli(*args)
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "not a sample store" in r.output
    assert not missing.exists()


def test_loader_rejects_npz_with_wrong_shapes_in_one_line(tmp_path: Path):
    p = tmp_path / "bad.npz"
    np.savez(p, image=np.zeros((2, 3, 16, 16), np.float32), audio=np.zeros((2, 40, 32), np.float32),
             label=np.array([0, 1]), mask=np.ones((2, 2), bool), quality=np.ones((2, 2), np.float32))
    with pytest.raises(DataError, match=r"'image' has shape \(2, 3, 16, 16\)"):
        load_data(p, image_size=32, n_mels=40, frames=32, num_classes=10, what="--data")


def test_ingest_keeps_the_gates_removals_in_the_store(tmp_path: Path):
    from fedge.edge.ingest import ingest

    rng = np.random.default_rng(0)
    textures = [cv2.resize(rng.integers(30, 255, (8, 8, 3)).astype(np.uint8), (64, 64),
                           interpolation=cv2.INTER_NEAREST) for _ in range(2)]
    video = tmp_path / "ab.avi"
    out = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 4, (64, 64))
    for i in range(4):  # shots A B A B: the repeats are near-duplicate keyframes
        for _ in range(4):
            out.write(textures[i % 2])
    out.release()
    rep = ingest(video=video, audio=None, store=tmp_path / "store", label=1, audio_from_video=False)
    assert rep.error is None and rep.rejected, rep.summary()
    r = _cli("stats", tmp_path / "store", "--json")
    assert json.loads(r.output)["rejected"] == rep.rejected
