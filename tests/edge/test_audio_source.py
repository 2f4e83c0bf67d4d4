"""Audio sources (edge/audio_source.py) on generated WAV/FLAC files and a generated video with an audio track."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from fedge.common.media.mel import MelParams
from fedge.edge.audio_source import AudioSourceError, find_ffmpeg, open_audio

ROOT = Path(__file__).resolve().parents[2]

def _stereo(sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], 1).astype(np.float32)


def _peak_hz(y: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * sr / len(y))


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_file_is_downmixed_resampled_and_read_in_chunks(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    st = _stereo(44100, 2.5)
    sf.write(path, st, 44100, format=fmt)
    src = open_audio(path, sr=16000, chunk_s=0.25)
    assert (src.native_sr, src.channels, src.via) == (44100, 2, "soundfile")
    chunks = list(src.chunks())
    assert len(chunks) >= 9 and max(len(c) for c in chunks) <= 0.25 * 16000 + 1  # bounded blocks
    y = np.concatenate(chunks)
    assert len(y) == 40000 and src.seconds_out == pytest.approx(2.5)
    ref = scipy.signal.resample_poly(st.astype(np.float64).mean(axis=1), 160, 441)
    np.testing.assert_allclose(y, ref, atol=2e-4)  # 16-bit / float rounding of the file
    assert _peak_hz(y, 16000) == pytest.approx(440, abs=2)


def test_stdlib_wave_reader_gives_the_same_samples(tmp_path):
    from fedge.edge import audio_source

    path = tmp_path / "w.wav"
    st = _stereo(22050, 1.0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes((st * 32767).astype("<i2").tobytes())
    rate, ch, dur, blocks, via = audio_source._open_wave(str(path), 0.5)
    assert (rate, ch, dur, via) == (22050, 2, 1.0, "wave")
    via_wave = np.concatenate(list(blocks))
    np.testing.assert_allclose(via_wave, sf.read(path, dtype="float32")[0], atol=1e-6)


def _video_with_audio(tmp_path: Path, seconds: float = 2.0, sr: int = 48000) -> Path:
    import cv2

    vid = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(int(25 * seconds)):
        vw.write(np.full((48, 64, 3), (i * 5) % 255, np.uint8))
    vw.release()
    wav = tmp_path / "track.wav"
    sf.write(wav, _stereo(sr, seconds), sr)
    out = tmp_path / "va.mkv"
    exe = find_ffmpeg()
    assert exe is not None, "ffmpeg (or the imageio-ffmpeg wheel of the edge extra) is needed for this test"
    subprocess.run([exe, "-y", "-v", "error", "-i", str(vid), "-i", str(wav), "-c:v", "copy", "-c:a", "flac",
                    "-shortest", str(out)], check=True, timeout=60)
    return out


def test_audio_track_of_a_video_through_ffmpeg(tmp_path):
    src = open_audio(_video_with_audio(tmp_path), sr=16000)
    assert src.via == "ffmpeg" and src.native_sr == 48000
    y = src.read_all()
    assert abs(len(y) / 16000 - 2.0) < 0.05 and src.error is None
    assert _peak_hz(y, 16000) == pytest.approx(440, abs=2)


def test_video_without_audio_track_and_non_media_file(tmp_path):
    import cv2

    vid = tmp_path / "silent.avi"
    vw = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"MJPG"), 25, (32, 32))
    for _ in range(10):
        vw.write(np.zeros((32, 32, 3), np.uint8))
    vw.release()
    with pytest.raises(AudioSourceError, match="no audio track"):
        open_audio(vid)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(AudioSourceError, match="not an audio or video file"):
        open_audio(junk)


def test_missing_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    vid = _video_with_audio(tmp_path, seconds=0.5)
    monkeypatch.setenv("FEDGE_FFMPEG", "")  # switches the lookup off, as on a device without ffmpeg
    with pytest.raises(AudioSourceError, match="ffmpeg .* is not available"):
        open_audio(vid)
    with pytest.raises(AudioSourceError, match="not available at /no/such/ffmpeg"):
        open_audio(vid, ffmpeg="/no/such/ffmpeg")


def test_bad_audio_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(AudioSourceError, match="audio not found"):
        open_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioSourceError, match="zero length"):
        open_audio(empty)
    (tmp_path / "zero.flac").write_bytes(b"")
    with pytest.raises(AudioSourceError, match="zero length"):
        open_audio(tmp_path / "zero.flac")
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(3000, np.float32), 2000)
    with pytest.raises(AudioSourceError, match="unexpected sample rate 2000 Hz"):
        open_audio(low)
    nan = tmp_path / "nan.wav"
    x = np.zeros(16000 * 2, np.float32)
    x[24000] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    src = open_audio(nan, chunk_s=0.5)
    with pytest.raises(AudioSourceError, match=r"non-finite samples at 1\.500 s"):
        src.read_all()
    for e in (AudioSourceError("x"),):
        assert "\n" not in str(e)


@pytest.mark.integration
def test_hour_long_file_is_read_with_bounded_memory(tmp_path):
    """One hour of 16 kHz mono (230 MB as float32 in memory) read in 1 s chunks: peak RSS grows far less."""
    path = tmp_path / "hour.wav"
    sr, block = 16000, 16000 * 60
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        tone = (0.1 * np.sin(2 * np.pi * 300 * np.arange(block) / sr)).astype(np.float32)
        for _ in range(60):
            f.write(tone)
    code = (
        "import resource, sys\n"
        "from fedge.edge.audio_source import open_audio\n"
        "from fedge.common.media.audio import MelStream\n"
        f"src = open_audio({str(path)!r}, sr=16000)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "ms = MelStream(); n = 0\n"
        "for c in src.chunks(): n += ms.push(c).shape[1]\n"
        "n += ms.flush().shape[1]\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(src.seconds_out, n, (after - before) / 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    seconds, frames, grown_mb = r.stdout.split()
    assert float(seconds) == pytest.approx(3600.0)
    assert int(frames) == MelParams().n_frames(3600 * 16000)
    assert float(grown_mb) < 60  # the whole signal would be 230 MB in float32


def test_truncated_flac_keeps_what_decoded_and_says_where_it_broke(tmp_path):
    full = tmp_path / "full.flac"
    sf.write(full, _stereo(16000, 4.0), 16000)
    data = full.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    src = open_audio(cut, chunk_s=1.0)
    y = src.read_all()
    assert src.error is not None and "broken" in src.error and "\n" not in src.error
    assert 1.0 < len(y) / 16000 < 4.0  # more than the whole blocks before the break
    np.testing.assert_allclose(y, sf.read(full, dtype="float32")[0].mean(axis=1)[: len(y)], atol=1e-4)
