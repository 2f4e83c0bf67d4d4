"""Ingest (edge/ingest.py) and ``fedge edge ingest`` on generated videos and audio: alignment of keyframes
with their audio windows, camera-only and microphone-only devices, the quality gate's counts, bad inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import soundfile as sf
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.common.media.audio import mel_power, power_to_db
from fedge.common.media.mel import MelParams
from fedge.edge.audio_source import find_ffmpeg
from fedge.edge.ingest import IngestError, ingest
from fedge.edge.store import SampleStore, StoreBudgetError

FPS, W, H, SHOT_S = 25, 160, 120, 2.0
TONES = (300.0, 700.0, 1500.0, 3000.0)  # one tone per shot: the audio says which shot a window belongs to
SR = 16000


def _write_video(path: Path, shots: int = 4) -> None:
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    rng = np.random.default_rng(0)
    for s in range(shots):
        base = cv2.resize(photos[s % 4], (W + 40, H + 40))[:, :, ::-1]
        for i in range(int(FPS * SHOT_S)):  # a slow pan with sensor noise
            fr = base[i % 20 : i % 20 + H, (i // 2) % 20 : (i // 2) % 20 + W]
            vw.write(np.clip(fr + rng.normal(0, 3, fr.shape), 0, 255).astype(np.uint8))
    vw.release()


def _tones(sr: int, shots: int = 4, silent: tuple[float, float] | None = None) -> np.ndarray:
    t = np.arange(int(sr * SHOT_S * shots)) / sr
    y = np.zeros_like(t)
    for s in range(shots):
        m = (t >= SHOT_S * s) & (t < SHOT_S * (s + 1))
        y[m] = 0.3 * np.sin(2 * np.pi * TONES[s % 4] * t[m])
    if silent:
        y[(t >= silent[0]) & (t < silent[1])] = 0.0
    return y.astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    _write_video(d / "shots.avi")
    sf.write(d / "tones.wav", _tones(SR), SR)
    sf.write(d / "tones44k.wav", np.stack([_tones(44100)] * 2, 1), 44100)  # stereo, another rate
    exe = find_ffmpeg()
    assert exe is not None, "ffmpeg (the imageio-ffmpeg wheel of the edge extra) is needed"
    subprocess.run([exe, "-y", "-v", "error", "-i", str(d / "shots.avi"), "-i", str(d / "tones.wav"),
                    "-c:v", "copy", "-c:a", "flac", str(d / "av.mkv")], check=True, timeout=60)
    return {"video": d / "shots.avi", "wav": d / "tones.wav", "wav44": d / "tones44k.wav", "av": d / "av.mkv"}


def _band(freq: float) -> int:
    """The mel band where a steady tone of ``freq`` Hz peaks."""
    t = np.arange(SR) / SR
    return int(np.argmax(mel_power((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))[:, 30]))


def _tone_at(t: float) -> float:
    return TONES[min(int(t // SHOT_S), 3)]


@pytest.mark.parametrize("audio_key", [None, "wav", "wav44"])
def test_keyframe_alignment_pairs_keyframes_with_the_audio_window_at_their_time(tmp_path, media, audio_key):
    video = media["av"] if audio_key is None else media["video"]
    st = SampleStore(tmp_path / "s")
    rep = ingest(video=video, audio=None if audio_key is None else media[audio_key], store=st, label=1,
                 align="keyframe")
    assert rep.modalities == ("image", "audio") and rep.error is None
    assert rep.frames_decoded == 4 * SHOT_S * FPS and rep.keyframes >= 4
    assert rep.audio_seconds == pytest.approx(4 * SHOT_S, abs=0.01)
    full_db = mel_power(sf.read(media["wav"], dtype="float32")[0], MelParams())  # the 16-bit file's samples
    both = [s for s in st.iter_samples() if s.modalities == ("image", "audio")]
    assert len(both) >= 4
    shots_seen = set()
    for s in both:
        t = s.stream_time
        assert s.audio is not None and s.audio.shape == (40, 32) and s.label == 1
        if abs(t - round(t / SHOT_S) * SHOT_S) > 0.3:  # away from a cut, the window's tone is the shot's
            assert int(np.argmax(s.audio[:, 16])) == _band(_tone_at(t))
        shots_seen.add(int(t // SHOT_S))
        if audio_key != "wav44":  # same samples: the stored window is the offline window at that time
            start = min(max(round(t * SR / 256) - 16, 0), full_db.shape[1] - 32)
            ref = power_to_db(full_db[:, start : start + 32], top_db=80.0)
            np.testing.assert_allclose(s.audio, ref, atol=0.07)  # float16 storage
    assert shots_seen == {0, 1, 2, 3}  # a keyframe from every shot
    arr = st.load_arrays()
    assert arr["mask"].any(axis=0).all() and (arr["label"] == 1).all()
    assert rep.bytes_in > rep.bytes_stored > 0


def test_camera_only_device_stores_image_samples_and_says_so(tmp_path, media):
    rep = ingest(video=media["video"], store=tmp_path / "s")
    assert rep.modalities == ("image",)
    assert any("camera-only" in n and "no audio track" in n for n in rep.notes)
    st = SampleStore(tmp_path / "s")
    assert all(s.modalities == ("image",) for s in st.iter_samples()) and len(st) == rep.samples_stored >= 4
    assert st.load_arrays()["mask"].tolist() == [[True, False]] * len(st)


def test_microphone_only_device_stores_windows_at_a_regular_stride(tmp_path, media):
    rep = ingest(audio=media["wav"], store=tmp_path / "s", mic_stride=0.5)
    assert rep.modalities == ("audio",) and any("microphone-only" in n for n in rep.notes)
    st = SampleStore(tmp_path / "s")
    times = [s.stream_time for s in st.iter_samples()]
    assert len(times) == rep.samples_stored == rep.audio_windows == 16  # 8 s every 0.5 s
    assert np.allclose(np.diff(times), 0.5)
    for s in st.iter_samples():
        assert s.modalities == ("audio",)
        if abs(s.stream_time - round(s.stream_time / SHOT_S) * SHOT_S) > 0.3:
            assert int(np.argmax(s.audio[:, 16])) == _band(_tone_at(s.stream_time))


def test_gate_removes_silent_windows_and_duplicate_keyframes_and_counts_them(tmp_path, media):
    wav = tmp_path / "gap.wav"
    sf.write(wav, _tones(SR, silent=(2.0, 6.0)), SR)
    rep = ingest(audio=wav, store=tmp_path / "s", mic_stride=0.5)
    assert rep.rejected.get("audio:silent", 0) >= 6 and rep.samples_rejected == rep.rejected["audio:silent"]
    st = SampleStore(tmp_path / "s")
    assert all(not 2.3 < s.stream_time < 5.7 for s in st.iter_samples())
    rep2 = ingest(video=media["video"], store=tmp_path / "v", keyframe_options={"max_interval": 0.5})
    assert rep2.rejected.get("image:duplicate", 0) >= 1  # periodic keyframes of a slow pan are near-duplicates
    assert rep2.keyframes_kept + rep2.rejected["image:duplicate"] == rep2.keyframes


def test_api_errors(tmp_path, media):
    with pytest.raises(IngestError, match="nothing to ingest"):
        ingest(store=tmp_path / "s")
    with pytest.raises(StoreBudgetError, match="too small for one sample"):
        ingest(video=media["video"], store=SampleStore(tmp_path / "b", budget_bytes=2000))


def test_disk_full_during_ingest_stops_cleanly_and_keeps_what_was_stored(tmp_path, media):
    st = SampleStore(tmp_path / "s", max_pages=24)  # ~100 KB database: fills part-way through the video
    rep = ingest(video=media["av"], store=st)
    assert rep.error is not None and "disk full" in rep.error and "\n" not in rep.error
    assert 0 < rep.samples_stored < rep.keyframes
    assert len(SampleStore(tmp_path / "s")) == rep.samples_stored


# ----------------------------------------------------------------------------------------- CLI
def _cli(*args: str):
    return CliRunner().invoke(build_app(), ["edge", "ingest", *args])


def test_cli_summary(tmp_path, media):
    r = _cli("--video", str(media["video"]), "--audio", str(media["wav"]), "--store", str(tmp_path / "s"),
             "--label", "3")
    assert r.exit_code == 0, r.output
    for key in ("frames decoded  : 200", "keyframes kept", "seconds of audio: 8.00", "samples stored",
                "removed/rejected by reason", "bytes in (raw)", "bytes stored"):
        assert key in r.stdout
    assert (SampleStore(tmp_path / "s").load_arrays()["label"] == 3).all()


@pytest.mark.parametrize("case", ["missing", "not-video", "zero-audio", "bad-rate", "nan", "budget", "nothing"])
def test_cli_bad_inputs_one_line_error_non_zero_exit(tmp_path, media, case):
    store = str(tmp_path / "s")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video " * 200)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), SR)
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(3000, np.float32), 2000)
    nan = tmp_path / "nan.wav"
    x = _tones(SR)
    x[int(6.5 * SR)] = np.nan
    sf.write(nan, x, SR, subtype="FLOAT")
    args = {
        "missing": ["--video", str(tmp_path / "nope.mp4")],
        "not-video": ["--video", str(junk)],
        "zero-audio": ["--audio", str(empty)],
        "bad-rate": ["--audio", str(low)],
        "nan": ["--audio", str(nan)],
        "budget": ["--video", str(media["video"]), "--budget-mb", "0.001"],
        "nothing": [],
    }[case]
    expect = {"missing": "not found", "not-video": "not a video", "zero-audio": "zero length",
              "bad-rate": "unexpected sample rate 2000 Hz", "nan": r"non-finite samples at 6\.500 s",
              "budget": "too small for one sample", "nothing": "nothing to ingest"}[case]
    r = _cli(*args, "--store", store)
    assert r.exit_code != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert err and any(__import__("re").search(expect, ln) for ln in err), r.stderr
    assert all("Traceback" not in ln for ln in r.stderr.splitlines())
    if case == "nan":  # windows before the bad sample were stored and stay
        st = SampleStore(store)
        assert 0 < len(st) and max(s.stream_time for s in st.iter_samples()) < 6.5


def test_truncated_video_keeps_what_decoded_and_says_where_it_broke(tmp_path, media):
    data = media["video"].read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    rep = ingest(video=cut, audio=media["wav"], store=tmp_path / "s")
    assert 0 < rep.frames_decoded < 4 * SHOT_S * FPS and rep.samples_stored > 0
    assert rep.seconds >= 0 and any("broke" in n or "could not decode" in n for n in rep.notes), rep.notes
    r = _cli("--video", str(cut), "--store", str(tmp_path / "c"))
    assert r.exit_code == 0 and "note:" in r.stdout


def test_keyframe_interval_and_duration_options_reach_the_extractor(tmp_path):
    _write_video(tmp_path / "two.avi", shots=2)  # two 2 s shots

    def keyframes(name: str, *opts: str) -> list[float]:
        r = _cli("--video", str(tmp_path / "two.avi"), "--store", str(tmp_path / name), *opts)
        assert r.exit_code == 0, r.output
        return [s.stream_time or 0.0 for s in SampleStore(tmp_path / name).iter_samples()]

    dense = keyframes("dense", "--max-interval", "0.5", "--duration", "3")  # every 0.5 s at least, up to 3 s
    sparse = keyframes("sparse", "--min-interval", "3", "--max-interval", "4")
    assert len(dense) >= 5 and max(dense) < 3
    assert 1 <= len(sparse) <= 2 and all(np.diff(sparse) >= 3)


@pytest.mark.parametrize("opts", [["--min-interval", "-1"], ["--max-interval", "nan"], ["--max-interval", "0"],
                                  ["--min-interval", "2", "--max-interval", "1"], ["--duration", "0"],
                                  ["--duration", "inf"]])
def test_bad_interval_or_duration_is_one_line_naming_the_option(tmp_path, media, opts):
    r = _cli("--video", str(media["video"]), "--store", str(tmp_path / "s"), *opts)
    assert r.exit_code == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and opts[-2] in err[0], r.stderr
    assert not (tmp_path / "s").exists() or len(SampleStore(tmp_path / "s")) == 0
