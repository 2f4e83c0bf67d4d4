"""SampleStore (edge/store.py): round trip, training layout, budget and eviction, kill -9 during writes, a full
disk (SQLite's page limit returns the same SQLITE_FULL as a full file system), and the PyTorch Dataset."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedge.common.training import evaluate
from fedge.edge.store import (
    ROW_OVERHEAD,
    SampleDataset,
    SampleStore,
    StoreBudgetError,
    StoreFullError,
    sample_nbytes,
)

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _audio(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(-30, 10, (40, 32)).astype(np.float32)


def test_round_trip_of_all_modality_sets(tmp_path):
    st = SampleStore(tmp_path / "s")
    a = _audio(1)
    i1 = st.put(image_jpeg=_jpeg(1), audio=a, label=3, quality=(0.9, 0.5), device_time=100.0, stream_time=1.5,
                source="cam.mp4")
    i2 = st.put(image_jpeg=_jpeg(2), quality=(0.8, 0.0))
    i3 = st.put(audio=a, split="val")
    s1, s2, s3 = st.get(i1), st.get(i2), st.get(i3)
    assert s1.modalities == ("image", "audio") and s1.label == 3 and s1.quality == (0.9, 0.5)
    assert s1.image_jpeg == _jpeg(1) and (s1.device_time, s1.stream_time, s1.source) == (100.0, 1.5, "cam.mp4")
    np.testing.assert_allclose(s1.audio, a, atol=0.05)  # float16: ~3 significant digits of dB
    assert s2.modalities == ("image",) and s2.audio is None and s2.label is None
    assert s3.modalities == ("audio",) and s3.image_jpeg is None and s3.split == "val"
    assert st.stats()["modalities"] == {"image+audio": 1, "image": 1, "audio": 1}
    with pytest.raises(ValueError, match="at least one modality"):
        st.put(label=1)


def test_load_arrays_has_the_training_layout_and_trains(tmp_path):
    import torch

    from fedge.common.model import MultimodalMoE

    st = SampleStore(tmp_path / "s")
    for i in range(6):
        st.put(image_jpeg=_jpeg(i) if i % 3 != 2 else None, audio=_audio(i) if i % 3 != 1 else None,
               label=i % 2 if i < 5 else None, quality=(0.7, 0.6))
    d = st.load_arrays(image_size=32, n_mels=40, frames=32)
    assert d["image"].shape == (6, 3, 32, 32) and d["image"].dtype == np.float32
    assert 0.0 <= d["image"].min() and d["image"].max() <= 1.0
    assert d["audio"].shape == (6, 40, 32) and d["audio"].dtype == np.float32
    assert d["label"].dtype == np.int64 and d["label"][-1] == -1 and list(d["label"][:5]) == [0, 1, 0, 1, 0]
    assert d["mask"].dtype == bool and d["mask"].tolist()[:3] == [[True, True], [True, False], [False, True]]
    assert d["quality"].dtype == np.float32 and d["quality"].shape == (6, 2)
    # RGB order: a pure red keyframe comes back red in channel 0
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 2] = 255  # BGR
    st.put(image_jpeg=cv2.imencode(".png", red)[1].tobytes(), label=0, split="test")
    t = st.load_arrays(split="test")
    assert t["image"][0, 0].mean() > 0.95 and t["image"][0, 2].mean() < 0.05
    # the arrays go straight into the shared training code
    labeled = {k: v[:5] for k, v in d.items()}
    torch.manual_seed(0)
    res = evaluate(MultimodalMoE(num_classes=2, num_experts=4, top_k=2, dim=16), labeled)
    assert res["examples"] == 5.0


def test_dataset_yields_the_same_items_as_load_arrays(tmp_path):
    import torch

    st = SampleStore(tmp_path / "s")
    for i in range(5):
        st.put(image_jpeg=_jpeg(i), audio=_audio(i) if i % 2 else None, label=i if i < 4 else None)
    arrays = st.load_arrays()
    ds = SampleDataset(st)
    assert len(ds) == 5 and len(SampleDataset(st, labeled_only=True)) == 4
    for i in range(5):
        item = ds[i]
        for k in arrays:
            assert torch.equal(item[k], torch.as_tensor(arrays[k][i])), k
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)))  # own connection per worker
    assert batch["image"].shape == (5, 3, 32, 32) and batch["mask"].shape == (5, 2)


def test_budget_evicts_oldest_first_and_never_exceeds(tmp_path):
    per = sample_nbytes(_jpeg(0), _audio(0).astype(np.float16))
    st = SampleStore(tmp_path / "s", budget_bytes=int(per * 3.5))
    ids = [st.put(image_jpeg=_jpeg(0), audio=_audio(i), label=i) for i in range(10)]
    assert st.ids() == ids[-3:]  # oldest gone first
    s = st.stats()
    assert s["payload_bytes"] <= s["budget_bytes"] and s["evicted"] == 7
    # the budget persists in the store and can be lowered later
    st.close()
    again = SampleStore(tmp_path / "s")
    assert again.budget_bytes == int(per * 3.5)
    lower = SampleStore(tmp_path / "s", budget_bytes=per * 2)
    lower.put(image_jpeg=_jpeg(0), audio=_audio(99))
    assert len(lower) == 2


def test_budget_too_small_for_one_sample_is_a_clear_error(tmp_path):
    st = SampleStore(tmp_path / "s", budget_bytes=500)
    with pytest.raises(StoreBudgetError, match=r"store budget 500 bytes is too small for one sample \(\d+ bytes\)"):
        st.put(image_jpeg=_jpeg(0), audio=_audio(0))
    assert len(st) == 0
    with pytest.raises(StoreBudgetError, match="must be >= 1"):
        SampleStore(tmp_path / "t", budget_bytes=0)
    assert ROW_OVERHEAD < 500


def test_disk_full_rolls_back_and_keeps_earlier_samples(tmp_path):
    """SQLite's max_page_count makes the database file full exactly like a full disk (SQLITE_FULL)."""
    st = SampleStore(tmp_path / "s", max_pages=40)  # 40 pages of 4 KiB
    big = np.random.default_rng(0).integers(0, 255, 20000, dtype=np.uint8).tobytes()  # 5 pages per sample
    written = []
    with pytest.raises(StoreFullError, match="disk full while writing .* nothing written"):
        for i in range(100):
            written.append(st.put(image_jpeg=big, label=i))
    assert 0 < len(written) < 100
    # a batch that does not fit is all-or-nothing
    with pytest.raises(StoreFullError):
        st.put_many([{"image_jpeg": big[:100], "label": -5}] + [{"image_jpeg": big, "label": -6}] * 3)
    st.close()
    st = SampleStore(tmp_path / "s")
    assert st.ids() == written
    assert [st.get(i).label for i in written] == list(range(len(written)))
    assert all(st.get(i).image_jpeg == big for i in written)
    conn = sqlite3.connect(st.path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM samples WHERE label < 0").fetchone()[0] == 0


_WRITER = """
import sys, numpy as np
from fedge.edge.store import SampleStore
st = SampleStore(sys.argv[1], budget_bytes=int(sys.argv[2]))
rng = np.random.default_rng(0)
i = 0
while True:
    n = int(rng.integers(2000, 30000))
    payload = bytes([i % 251]) * n                      # content derivable from the label: checkable later
    audio = np.full((40, 32), float(i % 97), np.float32)
    sid = st.put(image_jpeg=payload, audio=audio, label=i)
    print(sid, i, n, flush=True)                        # reported only after put() returned
    i += 1
"""


@pytest.mark.integration
@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_kill_9_during_writes_loses_nothing_reported_and_shows_nothing_partial(tmp_path, delay):
    root = tmp_path / f"s{delay}"
    budget = 400_000  # small enough that evictions happen while it is killed
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(budget)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    reported: list[tuple[int, int, int]] = []
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end:
        line = proc.stdout.readline()
        if not line:
            break
        reported.append(tuple(int(x) for x in line.split()))  # type: ignore[arg-type]
        if len(reported) == 1:
            t_kill = time.monotonic() + delay
        if len(reported) > 1 and time.monotonic() >= t_kill:
            proc.send_signal(signal.SIGKILL)  # mid-stream: the writer is inside put() most of the time
            break
    proc.wait(timeout=30)
    rest = proc.stdout.read()
    reported += [tuple(int(x) for x in ln.split()) for ln in rest.splitlines() if ln.strip()]  # type: ignore[misc]
    assert proc.returncode == -signal.SIGKILL and len(reported) > 5

    st = SampleStore(root)
    present = set(st.ids())
    # every reported sample is there unless the budget evicted it (eviction is oldest-first, so the reported
    # ones still present form a suffix, and the newest reported one is always there)
    rep_ids = [r[0] for r in reported]
    assert rep_ids[-1] in present
    kept = [r for r in reported if r[0] in present]
    assert kept == [r for r in reported if r[0] >= kept[0][0]]
    # nothing partial: every row present is whole and consistent with what the writer wrote
    for s in st.iter_samples():
        i = s.label
        assert s.image_jpeg is not None and s.audio is not None and i is not None
        assert s.image_jpeg == bytes([i % 251]) * len(s.image_jpeg)
        assert np.all(s.audio == float(i % 97))
    by_id = {r[0]: r for r in reported}
    for sid in present & set(by_id):
        s = st.get(sid)
        assert (s.label, len(s.image_jpeg or b"")) == by_id[sid][1:]
    extra = present - set(by_id)  # at most the one whose commit landed just before the kill
    assert len(extra) <= 1 and all(e > rep_ids[-1] for e in extra)
    assert st.stats()["payload_bytes"] <= budget
    assert sqlite3.connect(st.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
