"""Audio features (common/media/audio.py, mel.py, resample.py) against librosa, and streaming == offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import scipy.signal

from fedge.common.media.audio import MelStream, logmel, mel_power, mfcc, power_to_db
from fedge.common.media.mel import MelParams, mel_filterbank
from fedge.common.media.resample import StreamResampler

ROOT = Path(__file__).resolve().parents[3]


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
        "from fedge.common.media.audio import MelStream, logmel, mfcc\n"
        "from fedge.common.media.mel import MelParams\n"
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
