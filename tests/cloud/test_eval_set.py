"""The server's evaluation set: `data.eval_path` as given (a store or an NPZ), or no accuracy at all; never a
generated task's score."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedge.cloud import clock as clk
from fedge.cloud.builders import global_model, heldout_data, state_kwargs
from fedge.cloud.server_loop import ServerLoop
from fedge.common.config import load_config
from fedge.common.dataset import DataError
from fedge.edge.store import SampleStore


def _eval_store(path: Path) -> Path:
    jpeg = cv2.imencode(".jpg", np.full((40, 40, 3), 120, np.uint8))[1].tobytes()
    with SampleStore(path) as st:
        for i in range(6):
            st.put(image_jpeg=jpeg, audio=np.zeros((40, 32), np.float32), label=i % 4, split="test",
                   source="held.mp4", stream_time=float(i))
    return path


def test_no_eval_path_means_no_eval_set_and_no_generated_one():
    assert heldout_data(load_config()) is None
    assert heldout_data(load_config(overrides={"simulation.dataset": "synthetic"})) is None


def test_eval_path_may_be_a_store_and_its_labels_must_fit_the_model(tmp_path: Path):
    store = _eval_store(tmp_path / "held")
    data = heldout_data(load_config(overrides={"data.eval_path": str(store)}))
    assert data is not None and data["label"].tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(DataError, match=r"data\.eval_path .*held: sample 4 \(held\.mp4 at 3\.00 s\) has label 3"):
        heldout_data(load_config(overrides={"data.eval_path": str(store), "model.num_classes": 3}))


@pytest.mark.integration
def test_a_version_without_eval_set_is_recorded_without_accuracy(tmp_path: Path, ray_session, capsys):
    import ray

    from fedge.cloud.state import start_actor
    from fedge.common.lora import adapter_state

    cfg = load_config()
    model = global_model(cfg)
    initial = {k: v.numpy() for k, v in adapter_state(model).items()}
    actor = start_actor(None, initial=initial, name="fedge-aggregator-no-eval-test", **state_kwargs(cfg, None))
    try:
        loop = ServerLoop(None, cfg, actor=actor, clock=clk.VirtualClock(), run_dir=tmp_path, eval_data=None,
                          model=model, num_partitions=1)
        loop._record_version(1, 0.0)
    finally:
        ray.kill(actor)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["version"] == 1 and "accuracy" not in rec and "loss" not in rec
    assert "accuracy -" in capsys.readouterr().out
