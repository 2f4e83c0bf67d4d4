"""README "Train on your own data": its bash block, verbatim, on generated labelled recordings.

The recordings: camera shots of a class-tinted texture (a cut every span) with a class tone on the microphone,
and a CSV of the spans. The block runs in a temporary directory; the only change is a smaller run, passed as
``--set`` overrides by a ``fedge`` on ``PATH`` that appends them to ``fedge simulate``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FPS, SIZE, SR = 8, 64, 16_000
TONES = (330.0, 660.0, 1320.0)  # Hz per class
TINTS = ((1.0, 0.3, 0.3), (0.3, 1.0, 0.3), (0.3, 0.3, 1.0))  # BGR gain per class
SMALL = ["aggregation.versions=1", "train.local_steps=2", "simulation.pretrain_steps=20"]


def readme_block(readme: Path = ROOT / "README.md") -> str:
    """The first ``bash`` block of the README's "Train on your own data" section."""
    text = readme.read_text()
    section = text[text.index("## Train on your own data"):]
    section = section[:section.index("\n## ", 3)]
    m = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert m, "no bash block in the section"
    return m.group(1)


def write_recording(folder: Path, name: str, *, seconds: int, seed: int) -> list[int]:
    """``name``.avi (a shot per second), ``name``.wav (a class tone per second) and ``name``.csv; the labels."""
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in rng.integers(0, len(TONES), seconds)]
    out = cv2.VideoWriter(str(folder / f"{name}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (SIZE, SIZE))
    for c in labels:
        texture = cv2.resize(rng.integers(40, 255, (8, 8, 3)).astype(np.float32), (SIZE, SIZE),
                             interpolation=cv2.INTER_NEAREST)
        frame = np.clip(texture * np.array(TINTS[c], np.float32), 0, 255).astype(np.uint8)
        for _ in range(FPS):
            out.write(frame)
    out.release()
    t = np.arange(SR) / SR
    audio = np.concatenate([0.3 * np.sin(2 * np.pi * TONES[c] * t) + 0.01 * rng.standard_normal(SR)
                            for c in labels])
    with wave.open(str(folder / f"{name}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    (folder / f"{name}.csv").write_text("start_s,end_s,label\n" + "".join(
        f"{i},{i + 1},{c}\n" for i, c in enumerate(labels)))
    return labels


@pytest.mark.integration
def test_readme_own_data_commands_run_verbatim(tmp_path: Path):
    rec = tmp_path / "recordings"
    rec.mkdir()
    for i, name in enumerate(("device-0", "device-1", "heldout", "cloud")):
        write_recording(rec, name, seconds=16, seed=i)
    (tmp_path / "simulations" / "scenarios").mkdir(parents=True)
    scenario = ROOT / "simulations" / "scenarios" / "own_data.toml"
    (tmp_path / "simulations" / "scenarios" / "own_data.toml").write_text(scenario.read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fedge = Path(sys.executable).parent / "fedge"
    sets = " ".join(f"--set {s}" for s in SMALL)
    (bin_dir / "fedge").write_text(
        f'#!/bin/bash\nif [ "$1" = simulate ]; then exec "{fedge}" "$@" {sets}; fi\nexec "{fedge}" "$@"\n')
    (bin_dir / "fedge").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "FEDGE_SIM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    assert sorted(p.name for p in (tmp_path / "data" / "stores").iterdir()) == ["device-0", "device-1"]
    assert "samples" in r.stdout and "time span" in r.stdout  # the store's stats
    with np.load(tmp_path / "data" / "heldout.npz") as z:
        assert len(z["label"]) > 0 and set(z["label"].tolist()) <= {0, 1, 2}
    report = (tmp_path / "runs" / "own" / "report.md").read_text()
    assert f"stores {(tmp_path / 'data' / 'stores').resolve()}/device-0..1" in report
    assert f"store {(tmp_path / 'data' / 'heldout').resolve()}" in report
    assert "own modalities (fused)" in r.stdout and "confusion matrix" in r.stdout  # fedge evaluate
    recs = [json.loads(x) for x in (tmp_path / "runs" / "own" / "metrics.jsonl").read_text().splitlines()]
    assert recs and "accuracy" in recs[-1]
    assert not (tmp_path / "cache").exists() or all(p.name.startswith("pretrain-")
                                                    for p in (tmp_path / "cache").iterdir())  # nothing rendered
