"""edge/resume.py and its use by the ingest and the agent: a restarted ingest never stores a span twice."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import soundfile as sf

from fedge.edge.agent import Child, child_env
from fedge.edge.ingest import ingest
from fedge.edge.resume import resume_point, source_key
from fedge.edge.store import SampleStore

ROOT = Path(__file__).resolve().parents[2]
SR = 16000
PHOTOS = (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea, skimage.data.rocket)


def _recording(d: Path, seconds: int) -> tuple[Path, Path]:
    """A video of 1-second shots of photos panned slowly, and a WAV with one tone per shot."""
    photos = [cv2.resize(f(), (120, 90))[:, :, ::-1] for f in PHOTOS]
    vw = cv2.VideoWriter(str(d / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 72))
    for s in range(seconds):
        for i in range(10):
            vw.write(np.ascontiguousarray(photos[s % 4][i:i + 72, i:i + 96]))
    vw.release()
    t = np.arange(seconds * SR) / SR
    sf.write(d / "a.wav", (0.3 * np.sin(2 * np.pi * (300 + 200 * (t.astype(int) % 4)) * t)).astype(np.float32), SR)
    return d / "v.avi", d / "a.wav"


def _rows(store: Path) -> tuple[int, int]:
    """(rows, distinct samples by source, stream time and modalities)."""
    with sqlite3.connect(store / "samples.db") as c:
        n = c.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        d = c.execute("SELECT COUNT(*) FROM (SELECT DISTINCT source, stream_time, modalities FROM samples)").fetchone()[0]
    return n, d


def test_a_second_ingest_of_the_same_recording_stores_nothing_new(tmp_path):
    video, wav = _recording(tmp_path, 6)
    first = ingest(video=video, audio=wav, store=tmp_path / "s")
    assert first.samples_stored >= 4
    again = ingest(video=video, audio=wav, store=tmp_path / "s")
    assert again.samples_stored == 0 and any("resumed after" in n for n in again.notes), again.notes
    assert again.samples_resumed == first.samples_stored
    # the CLI says so and succeeds: an agent restarting a finished ingest must not read it as a failure
    cmd = [sys.executable, "-m", "fedge.common.cli", "edge", "ingest", "--video", str(video), "--audio", str(wav),
           "--store", str(tmp_path / "s")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "no sample was stored" not in r.stderr and "resumed after" in r.stdout, r
    assert _rows(tmp_path / "s") == (first.samples_stored, first.samples_stored)
    st = SampleStore(tmp_path / "s")
    last = max(s.stream_time for s in st.iter_samples())
    assert resume_point(st, source_key(video, wav)) == pytest.approx(last)


def test_a_changed_file_is_a_new_recording_and_live_sources_have_no_key(tmp_path):
    video, wav = _recording(tmp_path, 3)
    key = source_key(video, wav)
    os.utime(video, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source_key(video, wav) != key and source_key(video, None) != key
    assert source_key(0, None) is None and source_key("rtsp://camera/1", None) is None


@pytest.mark.integration
def test_ingest_killed_at_random_moments_resumes_without_duplicates(tmp_path):
    video, wav = _recording(tmp_path, 40)
    ref = ingest(video=video, audio=wav, store=tmp_path / "ref").samples_stored
    store = tmp_path / "s"
    cmd = [sys.executable, "-m", "fedge.common.cli", "edge", "ingest", "--video", str(video), "--audio", str(wav),
           "--store", str(store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rnd, kills = random.Random(0), 0
    for _ in range(12):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill once samples are being written (the store exists), at a random moment
        t0 = time.monotonic()
        while not (store / "samples.db").exists() and p.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.4))
        if p.poll() is not None:
            assert p.returncode == 0
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    else:
        assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, check=False).returncode == 0
    rows, distinct = _rows(store)
    assert kills >= 2, "the ingest ended before it could be killed twice: make the recording longer"
    assert rows == distinct == ref, (kills, rows, distinct, ref)
    print(f"{kills} kills, {rows} rows, {distinct} distinct samples, {ref} in one uninterrupted ingest")


def test_the_agent_gives_up_on_a_recording_that_fails_alike_and_says_so(tmp_path, capsys):
    code = "import sys; print('error: non-finite samples at 6.500 s', file=sys.stderr); sys.exit(1)"
    c = Child("ingest", [sys.executable, "-c", code], child_env(), restart="on-failure", min_backoff_s=0.01,
              max_backoff_s=0.01, give_up_after=3)
    t0 = time.monotonic()
    while not c.done and time.monotonic() - t0 < 30:
        c.poll(time.monotonic())
        time.sleep(0.02)
    out = capsys.readouterr()
    assert c.done and c.starts == 3
    assert "giving up after 3 failures" in out.out and "non-finite samples at 6.500 s" in out.out
    # failures that differ are not "alike": the count starts again
    counter = tmp_path / "n"
    alternate = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0; "
                 "p.write_text(str(n + 1)); sys.exit(1 + n % 2)")
    flaky = Child("ingest", [sys.executable, "-c", alternate, str(counter)], child_env(), restart="on-failure",
                  min_backoff_s=0.0, max_backoff_s=0.0, give_up_after=2)
    while flaky.starts < 5:
        flaky.poll(time.monotonic())
        if flaky.proc is not None:
            flaky.proc.wait()
    flaky.poll(time.monotonic())
    assert not flaky.done
