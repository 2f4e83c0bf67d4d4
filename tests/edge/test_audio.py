"""Audio features (common/media/audio.py, mel.py, resample.py) against librosa, streaming == offline, and audio sources
(edge/audio_source.py) on generated WAV/FLAC files and a generated video with an audio track."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from common.media.audio import MelStream, logmel, mel_power, mfcc, power_to_db
from common.media.mel import MelParams, mel_filterbank
from common.media.resample import StreamResampler
from edge.audio_source import AudioSourceError, find_ffmpeg, open_audio

ROOT = Path(__file__).resolve().parents[2]


def _test_signal(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A glide, a chord and a faint noise floor: energy across the band and a wide dynamic range."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    glide = 0.4 * np.sin(2 * np.pi * (150 * t + 400 * t**2))
    chord = sum(0.15 * np.exp(-2 * (t % 0.7)) * np.sin(2 * np.pi * f * t) for f in (330.0, 415.0, 495.0))
    return (glide + chord + 1e-4 * rng.standard_normal(len(t))).astype(np.float32)


def _librosa_mel(y: np.ndarray, p: MelParams) -> np.ndarray:
    return librosa.feature.melspectrogram(
        y=y, sr=p.sr, n_fft=p.n_fft, hop_length=p.hop, win_length=p.win_len, window=p.window, center=p.center,
        pad_mode=p.pad_mode, power=p.power, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax, htk=p.htk, norm=p.norm)


PARAMS = [
    MelParams(),
    MelParams(sr=22050, n_fft=2048, hop_length=512, n_mels=128),
    MelParams(center=False),
    MelParams(pad_mode="reflect", n_mels=64),
    MelParams(n_fft=400, win_length=300, hop_length=160, window="hamming", htk=True, fmin=50.0, fmax=7000.0,
              norm=None, power=1.0),
    MelParams(sr=8000, n_fft=256, hop_length=None, n_mels=24, norm=2.0),
    MelParams(fft="scipy"),
    MelParams(n_fft=400, win_length=300, hop_length=160, window="hamming", htk=True, fmin=50.0, fmax=7000.0,
              norm=None, power=1.0, fft="scipy"),
    MelParams(sr=8000, n_fft=255, hop_length=100, n_mels=24),  # odd n_fft: no Nyquist bin
]


@pytest.mark.parametrize("kw", [{"sr": 16000, "n_fft": 512, "n_mels": 40},
                                {"sr": 22050, "n_fft": 2048, "n_mels": 128, "htk": True, "fmin": 30.0, "fmax": 8000.0,
                                     "norm": None},
                                {"sr": 8000, "n_fft": 256, "n_mels": 20, "norm": 1.0}])
def test_mel_filterbank_matches_librosa(kw):
    np.testing.assert_allclose(mel_filterbank(**kw), librosa.filters.mel(**kw), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"sr{p.sr}-fft{p.n_fft}-{p.window}-c{int(p.center)}-{p.fft}")
def test_logmel_and_mfcc_match_librosa(p):
    y = _test_signal(p.sr, 3.0)
    ref = librosa.power_to_db(_librosa_mel(y, p), ref=np.max, top_db=None)
    ours = logmel(y, p, ref=np.max, top_db=None)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    top = ref >= ref.max() - 80.0
    assert np.abs(ours - ref)[top].max() <= 0.01  # dB, over the top 80 dB
    ref_m = librosa.feature.mfcc(S=librosa.power_to_db(_librosa_mel(y, p)), n_mfcc=20, lifter=22)
    np.testing.assert_allclose(mfcc(y, p, n_mfcc=20, lifter=22), ref_m, atol=0.01)


def test_power_to_db_matches_librosa_including_top_db_and_callable_ref():
    s = np.abs(np.random.default_rng(0).standard_normal((10, 50))).astype(np.float32) ** 4
    for kw in ({}, {"ref": np.max}, {"ref": 2.0, "amin": 1e-5, "top_db": 40.0}, {"top_db": None}):
        np.testing.assert_allclose(power_to_db(s, **kw), librosa.power_to_db(s, **kw), atol=1e-4)


@pytest.mark.parametrize("p", PARAMS[:5], ids=lambda p: f"sr{p.sr}-fft{p.n_fft}-c{int(p.center)}-{p.pad_mode}")
def test_stream_in_random_chunks_equals_offline_exactly(p):
    y = _test_signal(p.sr, 7.3, seed=1)  # several kernel blocks and a ragged end
    rng = np.random.default_rng(2)
    s, parts, i = MelStream(p), [], 0
    while i < len(y):
        n = int(rng.choice([1, 7, 255, 256, 1000, 4096, 20000]))
        parts.append(s.push(y[i : i + n]))
        i += n
    parts.append(s.flush())
    streamed = np.concatenate(parts, axis=1)
    assert np.array_equal(streamed, mel_power(y, p))  # bit for bit
    assert s.frames_out == streamed.shape[1] == p.n_frames(len(y))


@pytest.mark.parametrize("p", [MelParams(), MelParams(pad_mode="reflect", fft="scipy"),
                               MelParams(pad_mode="edge", power=1.0, n_fft=401, hop_length=160)],
                         ids=lambda p: f"{p.pad_mode}-{p.fft}-fft{p.n_fft}")
def test_long_signal_padded_only_at_the_ends_equals_stream_and_librosa(p):
    # long enough that the offline path pads copies of the two ends only and reads the middle in place
    y = _test_signal(p.sr, 31.0, seed=3)
    s = MelStream(p)
    streamed = np.concatenate([s.push(y[i : i + 12345]) for i in range(0, len(y), 12345)] + [s.flush()], axis=1)
    offline = mel_power(y, p)
    assert np.array_equal(streamed, offline)
    ref = _librosa_mel(y, p)
    top = ref >= ref.max() * 1e-8  # the top 80 dB
    assert np.abs(10 * np.log10(offline[top] / ref[top])).max() <= 0.01


def test_threads_sharing_one_parameter_set_get_the_same_bits():
    from concurrent.futures import ThreadPoolExecutor

    p = MelParams()
    ys = [_test_signal(p.sr, 9.0, seed=s) for s in range(6)]
    want = [mel_power(y, p) for y in ys]
    with ThreadPoolExecutor(max_workers=3) as ex:  # the kernel's scratch buffers are per thread
        got = list(ex.map(lambda y: mel_power(y, p), ys * 3))
    assert all(np.array_equal(g, want[i % len(ys)]) for i, g in enumerate(got))


def test_features_run_in_the_calling_thread_only():
    # OpenCV starts its worker pool on the first parallel call: the kernel stays under its threshold
    code = (
        "import os, numpy as np\n"
        "from common.media.audio import MelStream, logmel, mfcc\n"
        "from common.media.mel import MelParams\n"
        "y = np.random.default_rng(0).standard_normal(16000 * 30).astype(np.float32)\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "for p in (MelParams(), MelParams(sr=22050, n_fft=2048, hop_length=512, n_mels=128)):\n"
        "    logmel(y, p); mfcc(y, p); s = MelStream(p); s.push(y); s.flush()\n"
        "print(before, len(os.listdir('/proc/self/task')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[0] == out[1], f"threads before/after: {out}"


def test_stream_shorter_than_one_frame_and_tiny_chunks():
    p = MelParams(pad_mode="reflect")
    y = _test_signal(p.sr, 0.02)  # 320 samples < n_fft
    s = MelStream(p)
    parts = [s.push(y[i : i + 3]) for i in range(0, len(y), 3)] + [s.flush()]
    assert np.array_equal(np.concatenate(parts, axis=1), mel_power(y, p))


@pytest.mark.parametrize("center", [True, False])
def test_non_finite_sample_anywhere_is_found(center):
    p = MelParams(center=center)
    y = _test_signal(p.sr, 20.0)  # long: padded ends, a middle read in place, samples after the last frame
    for i in (0, 3, 70000, 150000, len(y) - 300, len(y) - 1):
        for bad in (np.nan, np.inf, -np.inf):
            z = y.copy()
            z[i] = bad
            with pytest.raises(ValueError, match=rf"non-finite samples \(first at index {i}\)"):
                mel_power(z, p)
    z = y[:20000].copy()
    z[[0, 9000, -1]] = 3e38  # finite, but squares overflow the fast check: not an error
    assert mel_power(z, p).shape == (p.n_mels, p.n_frames(len(z)))


def test_bad_signals_give_one_line_errors():
    with pytest.raises(ValueError, match=r"non-finite samples \(first at index 5\)"):
        mel_power(np.r_[np.zeros(5, np.float32), np.nan, np.zeros(600, np.float32)])
    with pytest.raises(ValueError, match="too short"):
        mel_power(np.zeros(100, np.float32), MelParams(center=False))
    with pytest.raises(ValueError, match="mono 1-D"):
        mel_power(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="audio parameter 'fmin'"):
        MelParams(fmin=9000.0)
    with pytest.raises(ValueError, match="audio parameter 'window'"):
        MelParams(window="no-such-window")
    with pytest.raises(ValueError, match="audio parameter 'fft'"):
        MelParams(fft="fftw")
    s = MelStream()
    with pytest.raises(ValueError, match="non-finite"):
        s.push(np.array([0.0, np.inf], np.float32))


@pytest.mark.parametrize("rates", [(44100, 16000), (48000, 16000), (8000, 16000), (16000, 16000)])
def test_stream_resampler_equals_resample_poly(rates):
    a, b = rates
    x = np.random.default_rng(3).standard_normal(int(a * 1.3) + 11)
    rs, parts, i = StreamResampler(a, b), [], 0
    for n in [1, 5000, 17, 3333] * 100:
        if i >= len(x):
            break
        parts.append(rs.push(x[i : i + n]))
        i += n
    parts.append(rs.flush())
    ours = np.concatenate(parts)
    ref = scipy.signal.resample_poly(x, b, a)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------- sources
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
    from edge import audio_source

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
        "from edge.audio_source import open_audio\n"
        "from common.media.audio import MelStream\n"
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
