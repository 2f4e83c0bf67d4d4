"""Log-mel spectrogram and MFCC in NumPy (OpenCV's or SciPy's FFT), following librosa's conventions; offline
and streaming.

Pure numerics: no I/O, no librosa at run time. Parameter names and defaults of the helper functions follow
librosa 0.11 (``melspectrogram``, ``power_to_db``, ``mfcc``, ``filters.mel``) so that a reader can check one
against the other; :class:`MelParams` carries fedge's defaults (the model's audio input: 16 kHz, ``n_fft`` 512,
hop 256, 40 mel bands).

How it is fast (single precision throughout, one thread): frames are strided views of the signal (only the two
padded ends are copies); each block of :data:`BLOCK` frames is windowed into one cache-sized buffer and
transformed by ``cv2.dft`` (rows, real packed output; Intel IPP in the opencv-python wheels, about 3x
SciPy's pocketfft here; ``MelParams(fft="scipy")`` uses ``scipy.fft.rfft``); the spectrum is squared in place
and, for ``power=2``, ``re**2 + im**2`` and the mel sum are one float32 matrix product with the filterbank
expanded to the FFT's real/imaginary columns, split into runs of bands over the columns they cover (the
filterbank is mostly zeros); the dB conversion of :func:`logmel` works in place. The filterbank, window and
DCT matrix are computed once per parameter set. OpenCV is called on at most 65536 samples at a time, under
its threshold for handing work to its thread pool, so the features never use more than the calling thread
(an edge device's other cores decode video).

Why blocks: offline and streaming computation run the very same kernel on the very same blocks of frames
(block ``j`` always holds frames ``[j*BLOCK, (j+1)*BLOCK)``), so a stream fed in chunks of any size returns
exactly, bit for bit, what the offline function returns. Global operations (``ref=np.max``, ``top_db``) cannot
be applied to a stream before it ends; :func:`power_to_db` applies them to any window afterwards.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import scipy.fft
import scipy.signal
from numpy.lib.stride_tricks import as_strided

BLOCK = 256  # frames per kernel call; also the streaming granularity (exactness depends on it being fixed)
PAD_MODES = ("constant", "reflect", "edge")
FFTS = ("opencv", "scipy")
Norm = Literal["slaney"] | float | None


# ----------------------------------------------------------------------------------------- mel scale
def hz_to_mel(frequencies: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Hz -> mel (Slaney's auditory toolbox scale by default, HTK's ``2595 log10(1 + f/700)`` if ``htk``)."""
    f = np.asarray(frequencies, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp = 200.0 / 3  # linear below 1 kHz
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0  # logarithmic above 1 kHz
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mels)


def mel_to_hz(mels: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Mel -> Hz, the inverse of :func:`hz_to_mel`."""
    m = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    *,
    sr: int,
    n_fft: int,
    n_mels: int = 128,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: Norm = "slaney",
) -> np.ndarray:
    """Triangular mel filterbank, (n_mels, 1 + n_fft // 2) float32, as ``librosa.filters.mel``.

    ``norm="slaney"`` divides each triangle by its width in Hz (constant energy per band); a number p
    normalises each filter to unit p-norm; ``None`` leaves peaks at 1.
    """
    if fmax is None:
        fmax = sr / 2.0
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin, htk=htk), hz_to_mel(fmax, htk=htk), n_mels + 2), htk=htk)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    elif norm is not None:
        p = float(norm)
        w = np.abs(weights)
        length = w.max(axis=1) if math.isinf(p) else (w**p).sum(axis=1) ** (1.0 / p)
        length[length < np.finfo(np.float32).tiny] = 1.0
        weights = weights / length[:, None]
    return weights


def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..n_mfcc-1, (n_mfcc, n_mels) float64 (``scipy.fft.dct(type=2, norm='ortho')``)."""
    n = np.arange(n_mels)
    k = np.arange(n_mfcc)[:, None]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    basis[0] /= np.sqrt(2.0)
    return basis


# ----------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class MelParams:
    """STFT and mel parameters, librosa's names; defaults are the fedge model's audio input.

    ``win_length`` defaults to ``n_fft`` and ``hop_length`` to ``win_length // 4`` as in librosa; the window
    is any name ``scipy.signal.get_window`` knows (periodic, zero-padded to ``n_fft`` in the centre).
    ``fft`` is not a librosa parameter: the FFT engine, ``"opencv"`` (``cv2.dft``, Intel IPP in the
    opencv-python wheels; about 3x faster than SciPy's pocketfft for these sizes) or ``"scipy"``
    (``scipy.fft.rfft``). Both run single-threaded and agree with librosa to float32 rounding.
    """

    sr: int = 16000
    n_fft: int = 512
    hop_length: int | None = 256
    win_length: int | None = None
    window: str = "hann"
    center: bool = True
    pad_mode: str = "constant"
    power: float = 2.0
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float | None = None
    htk: bool = False
    norm: Norm = "slaney"
    fft: str = "opencv"

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"audio parameter '{key}': {msg}")

        check(self.sr > 0, "sr", "must be > 0")
        check(self.n_fft >= 2, "n_fft", "must be >= 2")
        check(1 <= self.win_len <= self.n_fft, "win_length", f"must be in [1, n_fft={self.n_fft}]")
        check(self.hop >= 1, "hop_length", "must be >= 1")
        check(self.pad_mode in PAD_MODES, "pad_mode", f"must be one of {PAD_MODES}")
        check(self.fft in FFTS, "fft", f"must be one of {FFTS}")
        check(self.power > 0, "power", "must be > 0")
        check(self.n_mels >= 1, "n_mels", "must be >= 1")
        top = self.sr / 2.0 if self.fmax is None else self.fmax
        check(0 <= self.fmin < top, "fmin", f"must be in [0, fmax={top})")
        check(top <= self.sr / 2.0 + 1e-9 or self.fmax is None, "fmax", f"must be <= sr/2 = {self.sr / 2}")
        check(self.norm is None or self.norm == "slaney" or isinstance(self.norm, (int, float)), "norm",
              "must be 'slaney', a number p, or None")
        try:
            scipy.signal.get_window(self.window, 8)
        except ValueError as e:
            raise ValueError(f"audio parameter 'window': {e}") from None

    @property
    def win_len(self) -> int:
        return self.n_fft if self.win_length is None else int(self.win_length)

    @property
    def hop(self) -> int:
        return self.win_len // 4 if self.hop_length is None else int(self.hop_length)

    def n_frames(self, n_samples: int) -> int:
        """Frames that ``n_samples`` samples make (librosa's count; 0 when too short without centring)."""
        padded = n_samples + (2 * (self.n_fft // 2) if self.center else 0)
        return 0 if padded < self.n_fft else 1 + (padded - self.n_fft) // self.hop

    def frame_time(self, index: np.ndarray | int) -> np.ndarray:
        """Centre time in seconds of frame ``index`` (``librosa.frames_to_time`` with ``n_fft`` when not centred)."""
        offset = 0 if self.center else self.n_fft // 2
        return (np.asarray(index) * self.hop + offset) / float(self.sr)


class _Kernel:
    """Precomputed window, grouped filterbank and block kernel for one :class:`MelParams`.

    The FFT writes each frame's spectrum as a row of real numbers (OpenCV: ``[Re0, Re1, Im1, ..., Re_{n/2}]``;
    SciPy: ``[Re0, Im0, Re1, Im1, ...]``), squared in place. For ``power == 2`` the filterbank is expanded to
    those columns (column ``c`` holds part of bin ``col_bin[c]``), so that ``re**2 + im**2`` and the mel sum
    are one matrix product; otherwise the squares are summed per bin, raised to ``power / 2`` and projected.
    The product is split into groups of consecutive mel bands, each over the columns its triangles cover
    (:func:`_band_groups`), which skips the filterbank's zeros.
    """

    def __init__(self, p: MelParams) -> None:
        self.p = p
        n_fft = p.n_fft
        win = scipy.signal.get_window(p.window, p.win_len, fftbins=True)
        lpad = (n_fft - p.win_len) // 2
        self.window = np.pad(win, (lpad, n_fft - p.win_len - lpad)).astype(np.float32)  # (n_fft,)
        self.basis = mel_filterbank(sr=p.sr, n_fft=n_fft, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax,
                                    htk=p.htk, norm=p.norm)  # (n_mels, F)
        self.n_bins = 1 + n_fft // 2
        if p.fft == "opencv":
            self.n_cols = n_fft
            col_bin = (np.arange(n_fft) + 1) // 2
            # rows per cv2.dft call: at most 65536 samples, under which OpenCV runs the rows in this thread
            self.rows = max(1, min(BLOCK, 65536 // n_fft))
        else:
            self.n_cols = 2 * self.n_bins
            col_bin = np.arange(self.n_cols) // 2
            self.rows = BLOCK
        self.packed = p.power == 2.0
        if self.packed:
            weights = self.basis[:, col_bin]  # (n_mels, n_cols)
        else:
            weights = self.basis
        self.groups = [(a, b, lo, hi, np.ascontiguousarray(weights[a:b, lo:hi]))
                       for a, b, lo, hi in _band_groups(weights)]
        self._local = threading.local()  # scratch buffers, one set per thread

    def _scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's windowed frames, squared spectra and ``|X|**power`` buffers (64-byte aligned, so
        that every thread's FFT calls see the same alignment and return the same bits)."""
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = (_aligned((BLOCK, self.p.n_fft)), _aligned((BLOCK, self.n_cols)),
                                 _aligned((0 if self.packed else BLOCK, self.n_bins)))
        return s

    def block(self, frames: np.ndarray, out: np.ndarray) -> None:
        """Mel power of up to BLOCK frames: (n, n_fft) float32 view -> ``out`` (n_mels, n) float32."""
        n = frames.shape[0]
        bufs, sqs, pows = self._scratch()
        for i in range(0, n, self.rows):
            j = min(n, i + self.rows)
            buf = bufs[i:j]
            np.multiply(frames[i:j], self.window, out=buf)
            sq = sqs[i:j]
            if self.p.fft == "opencv":
                cv2.dft(buf, dst=sq, flags=cv2.DFT_ROWS)
            else:
                sq[...] = scipy.fft.rfft(buf, axis=-1, workers=1).view(np.float32)
            np.square(sq, out=sq)  # while it is in cache
        sq = sqs[:n]
        if not self.packed:
            pw = pows[:n]
            if self.p.fft == "opencv":  # re, im of bins 1..m in columns 1..2m; bin n_fft/2 (even n_fft) last
                m = (self.p.n_fft - 1) // 2
                pw[:, 0] = sq[:, 0]
                np.add(sq[:, 1 : 2 * m : 2], sq[:, 2 : 2 * m + 1 : 2], out=pw[:, 1 : m + 1])
                if self.p.n_fft % 2 == 0:
                    pw[:, -1] = sq[:, -1]
            else:
                np.add(sq[:, 0::2], sq[:, 1::2], out=pw)
            if self.p.power == 1.0:
                np.sqrt(pw, out=pw)
            else:
                np.power(pw, self.p.power / 2.0, out=pw)
            sq = pw
        for a, b, lo, hi, w in self.groups:
            if hi > lo:
                np.matmul(w, sq[:, lo:hi].T, out=out[a:b])
            else:
                out[a:b] = 0.0


def _aligned(shape: tuple[int, int], align: int = 64) -> np.ndarray:
    """Uninitialised float32 array whose first element sits on an ``align``-byte boundary."""
    size = shape[0] * shape[1]
    raw = np.empty(size + align // 4, dtype=np.float32)
    off = (-raw.ctypes.data % align) // 4
    return raw[off : off + size].reshape(shape)


def _band_groups(weights: np.ndarray, overhead: int = 512) -> list[tuple[int, int, int, int]]:
    """Split mel bands into runs ``[a, b)`` over columns ``[lo, hi)`` minimising the product's cost.

    Cost of a run: its bands times its columns (the multiply-adds per frame) plus ``overhead``, a call's fixed
    cost in the same units; dynamic programming over the run boundaries. Band ``m`` is nonzero only on
    ``[lo_m, hi_m)``.
    """
    m = weights.shape[0]
    nz = weights != 0
    any_nz = nz.any(axis=1)
    lo = np.where(any_nz, nz.argmax(axis=1), 0)
    hi = np.where(any_nz, weights.shape[1] - nz[:, ::-1].argmax(axis=1), 0)
    best = [0.0] + [math.inf] * m  # best[j]: cost of bands [0, j)
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        glo, ghi = math.inf, -math.inf
        for i in range(j - 1, -1, -1):  # run [i, j)
            if any_nz[i]:
                glo, ghi = min(glo, lo[i]), max(ghi, hi[i])
            width = max(0, ghi - glo) if ghi > glo else 0
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs = []
    j = m
    while j > 0:
        i = cut[j]
        sel = any_nz[i:j]
        if sel.any():
            runs.append((i, j, int(lo[i:j][sel].min()), int(hi[i:j][sel].max())))
        else:
            runs.append((i, j, 0, 0))
        j = i
    return runs[::-1]


@lru_cache(maxsize=16)
def _kernel(p: MelParams) -> _Kernel:
    return _Kernel(p)


def _check_signal(y: np.ndarray, *, finite: bool = True) -> np.ndarray:
    """Mono float signal -> contiguous float32; with ``finite``, also :func:`_check_finite`."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"audio must be mono 1-D, got shape {y.shape}")
    if y.dtype.kind != "f":
        raise ValueError(f"audio must be floating point, got {y.dtype}")
    y = np.ascontiguousarray(y, dtype=np.float32)
    if finite:
        _check_finite(y, y)
    return y


def _check_finite(part: np.ndarray, y: np.ndarray) -> None:
    """Raise if ``part`` (a piece of ``y``, or of ``y`` padded) has a NaN or inf, naming the first one in ``y``.

    One BLAS pass: a NaN or inf makes the sum of squares non-finite (so can an overflow: then look closer).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        fine = np.isfinite(np.dot(part, part))
    if not fine and not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ValueError(f"audio has non-finite samples (first at index {bad})")


def _pad(y: np.ndarray, left: int, right: int, mode: str) -> np.ndarray:
    if left == 0 and right == 0:
        return y
    return np.pad(y, (left, right), mode=mode)  # type: ignore[call-overload]


def _frames(yp: np.ndarray, n_fft: int, hop: int, count: int) -> np.ndarray:
    """(count, n_fft) strided read-only view of frames of ``yp`` (no copy)."""
    s = yp.strides[0]
    return as_strided(yp, shape=(count, n_fft), strides=(s * hop, s), writeable=False)


class _Padded:
    """Slices of the padded signal ``pad(y, pad, mode)`` without copying ``y``.

    Only the two ends are padded copies (``head``, ``tail``: ``span`` samples each, ``span`` being the
    longest slice asked for); a slice between them is a view of ``y``.
    """

    def __init__(self, y: np.ndarray, pad: int, mode: str, span: int) -> None:
        self.y, self.pad = y, pad
        k = span + pad  # y samples in each end copy; a slice of length <= span never straddles two parts
        if pad == 0 or len(y) <= 2 * k:
            self.head = _pad(y, pad, pad, mode)
            self.k = self.tail_at = len(y) + 2 * pad  # all of it in head; no tail
            self.tail = self.head[:0]
        else:
            self.head = _pad(y[:k], pad, 0, mode)  # padded[0 : k + pad]
            self.tail_at = len(y) - k + pad  # padded[tail_at :] = tail
            self.tail = _pad(y[-k:], 0, pad, mode)
            self.k = k + pad

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start, sl.stop
        if b <= self.k:
            return self.head[a:b]
        if a >= self.tail_at:
            return self.tail[a - self.tail_at : b - self.tail_at]
        return self.y[a - self.pad : b - self.pad]


# ----------------------------------------------------------------------------------------- offline
def mel_power(y: np.ndarray, params: MelParams = MelParams()) -> np.ndarray:
    """Mel spectrogram (power ``params.power``) of a mono signal: (n,) -> (n_mels, T) float32.

    Same result as ``librosa.feature.melspectrogram`` with the same parameters (to float32 rounding).
    Raises ``ValueError`` for non-finite samples or a signal too short for one frame.
    """
    y = _check_signal(y, finite=False)  # checked block by block below, while each block is in cache
    k = _kernel(params)
    p = params
    pad = p.n_fft // 2 if p.center else 0
    t = p.n_frames(len(y))
    if t == 0:
        _check_finite(y, y)
        raise ValueError(f"audio too short: {len(y)} samples give no frame of n_fft={p.n_fft}")
    _check_finite(y[max(0, (t - 1) * p.hop + p.n_fft - pad) :], y)  # the samples after the last frame
    span = (BLOCK - 1) * p.hop + p.n_fft  # samples under one block of frames
    yp = _Padded(y, pad, p.pad_mode, span)
    out = np.empty((p.n_mels, t), dtype=np.float32)
    for s in range(0, t, BLOCK):
        n = min(BLOCK, t - s)
        seg = yp[s * p.hop : s * p.hop + (n - 1) * p.hop + p.n_fft]
        _check_finite(seg, y)
        k.block(_frames(seg, p.n_fft, p.hop, n), out[:, s : s + n])
    return out


def power_to_db(
    S: np.ndarray,
    *,
    ref: float | Callable[[np.ndarray], float] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
) -> np.ndarray:
    """``10 log10(max(amin, S) / max(amin, ref))``, floored at ``max - top_db``; as ``librosa.power_to_db``."""
    mag = np.asarray(S)
    return _to_db(mag, np.maximum(mag, amin), ref=ref, amin=amin, top_db=top_db)  # the one new array


def _to_db(
    mag: np.ndarray,
    out: np.ndarray,
    *,
    ref: float | Callable[[np.ndarray], float],
    amin: float,
    top_db: float | None,
) -> np.ndarray:
    """:func:`power_to_db` of ``mag`` written over ``out`` (which may be ``mag`` itself)."""
    if amin <= 0:
        raise ValueError("power_to_db: amin must be > 0")
    if top_db is not None and top_db < 0:
        raise ValueError("power_to_db: top_db must be >= 0")
    ref_value = ref(mag) if callable(ref) else abs(ref)
    np.maximum(mag, amin, out=out)
    np.log10(out, out=out)
    out *= 10.0
    offset = 10.0 * np.log10(np.maximum(amin, ref_value))
    if offset != 0.0:
        out -= offset
    if top_db is not None:
        np.maximum(out, out.max() - top_db, out=out)
    return out


def logmel(
    y: np.ndarray,
    params: MelParams = MelParams(),
    *,
    ref: float | Callable[[np.ndarray], float] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
) -> np.ndarray:
    """Log-mel spectrogram in dB: ``power_to_db(mel_power(y))``, (n_mels, T) float32."""
    s = mel_power(y, params)
    return _to_db(s, s, ref=ref, amin=amin, top_db=top_db)  # in place: the power is not returned


def mfcc_from_db(S_db: np.ndarray, *, n_mfcc: int = 20, lifter: float = 0.0) -> np.ndarray:
    """MFCC from a log-mel spectrogram in dB: orthonormal DCT-II over mel bands, first ``n_mfcc`` rows.

    (n_mels, T) -> (n_mfcc, T) float32, as ``librosa.feature.mfcc(S=S_db, n_mfcc, dct_type=2, norm='ortho',
    lifter)``.
    """
    n_mels = S_db.shape[0]
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"n_mfcc must be in [1, n_mels={n_mels}], got {n_mfcc}")
    if lifter < 0:
        raise ValueError("lifter must be >= 0")
    m = (_dct(n_mfcc, n_mels) @ S_db).astype(np.float32)
    if lifter > 0:
        li = np.sin(np.pi * np.arange(1, 1 + n_mfcc, dtype=np.float32) / lifter)
        m *= (1 + (lifter / 2) * li)[:, None]
    return m


@lru_cache(maxsize=16)
def _dct(n_mfcc: int, n_mels: int) -> np.ndarray:
    return dct_matrix(n_mfcc, n_mels).astype(np.float32)


def mfcc(
    y: np.ndarray,
    params: MelParams = MelParams(),
    *,
    n_mfcc: int = 20,
    lifter: float = 0.0,
    ref: float | Callable[[np.ndarray], float] = 1.0,
    amin: float = 1e-10,
    top_db: float | None = 80.0,
) -> np.ndarray:
    """MFCC of a mono signal, (n_mfcc, T) float32, as ``librosa.feature.mfcc`` with the same parameters."""
    return mfcc_from_db(logmel(y, params, ref=ref, amin=amin, top_db=top_db), n_mfcc=n_mfcc, lifter=lifter)


# ----------------------------------------------------------------------------------------- streaming
class MelStream:
    """Chunked mel power: :meth:`push` samples as they come, :meth:`flush` at the end.

    The concatenation of everything returned equals :func:`mel_power` of the concatenated input exactly
    (same kernel, same blocks). Memory is bounded: at most one block of frames plus one chunk is buffered,
    in a buffer that grows by doubling (appending a chunk copies the chunk only).
    Frame ``i`` of the output is centred at ``params.frame_time(i)`` seconds.
    """

    def __init__(self, params: MelParams = MelParams()) -> None:
        self.params = params
        self._k = _kernel(params)
        self._pad = params.n_fft // 2 if params.center else 0
        self._head: np.ndarray | None = np.empty(0, np.float32)  # raw samples until the left pad is built
        self._buf = np.empty(0, np.float32)  # self._buf[:self._n]: padded samples from frame ``frames_out`` on
        self._n = 0
        self._tail = np.empty(0, np.float32)  # last pad+1 raw samples (right reflect/edge padding)
        self.frames_out = 0
        self.samples_in = 0
        self._closed = False

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Add samples; returns the mel frames completed so far, (n_mels, k) float32 (k may be 0)."""
        if self._closed:
            raise RuntimeError("MelStream: push after flush")
        x = _check_signal(chunk)
        self.samples_in += len(x)
        keep = self._pad + 1
        self._tail = x[-keep:].copy() if len(x) >= keep else np.concatenate([self._tail, x])[-keep:]
        if self._head is not None:
            # the left pad of reflect/edge modes needs the first pad+1 samples: hold input until then
            self._head = np.concatenate([self._head, x])
            if len(self._head) < keep:
                return self._empty()
            x, self._head = _pad(self._head, self._pad, 0, self.params.pad_mode), None
        self._append(x)
        return self._drain(final=False)

    def flush(self) -> np.ndarray:
        """End of stream: pad the right edge and return the remaining frames."""
        if self._closed:
            return self._empty()
        self._closed = True
        p = self.params
        if self._head is not None:  # too short for the streaming path: the offline one on what there is
            if p.n_frames(len(self._head)) == 0:
                return self._empty()
            self._append(_pad(self._head, self._pad, self._pad, p.pad_mode))
            self._head = None
        elif self._pad:
            self._append(_pad(self._tail, 0, self._pad, p.pad_mode)[len(self._tail) :])
        return self._drain(final=True)

    def _append(self, x: np.ndarray) -> None:
        need = self._n + len(x)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf)), np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = x
        self._n = need

    def _empty(self) -> np.ndarray:
        return np.empty((self.params.n_mels, 0), np.float32)

    def _drain(self, *, final: bool) -> np.ndarray:
        p = self.params
        avail = 0 if self._n < p.n_fft else 1 + (self._n - p.n_fft) // p.hop
        todo = avail if final else avail - avail % BLOCK
        if todo == 0:
            return self._empty()
        out = np.empty((p.n_mels, todo), dtype=np.float32)
        frames = _frames(self._buf[: self._n], p.n_fft, p.hop, todo)
        for s in range(0, todo, BLOCK):
            self._k.block(frames[s : s + BLOCK], out[:, s : s + BLOCK])
        rest = self._n - todo * p.hop  # drop the consumed prefix
        if len(self._buf) > 4 * (BLOCK * p.hop + p.n_fft) + 2 * rest:  # after a large chunk: shrink
            self._buf = self._buf[todo * p.hop : self._n].copy()
        else:
            self._buf[:rest] = self._buf[todo * p.hop : self._n]  # numpy copies overlapping ranges safely
        self._n = rest
        self.frames_out += todo
        return out


# ----------------------------------------------------------------------------------------- resampling
class StreamResampler:
    """Chunked polyphase resampling that equals ``scipy.signal.resample_poly(x, up, down)`` of the whole signal.

    Same filter as SciPy (Kaiser-windowed sinc, beta 5, ``10 * max(up, down)`` taps each side, zero padding
    at both ends); each output sample is the dot product of one polyphase branch with the inputs it covers, so
    chunk boundaries leave no seam. Memory: one filter's length of input history.
    """

    def __init__(self, sr_in: int, sr_out: int) -> None:
        if sr_in <= 0 or sr_out <= 0:
            raise ValueError(f"sample rates must be > 0, got {sr_in} -> {sr_out}")
        g = math.gcd(int(sr_in), int(sr_out))
        self.up, self.down = int(sr_out) // g, int(sr_in) // g
        self.n_in = 0
        self.n_out = 0
        if self.up == self.down == 1:
            return
        max_rate = max(self.up, self.down)
        half_len = 10 * max_rate
        h = scipy.signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        n_pre_pad = self.down - half_len % self.down
        h = np.concatenate([np.zeros(n_pre_pad), h])
        self._pre = (half_len + n_pre_pad) // self.down  # outputs scipy drops at the start
        self._q = -(-len(h) // self.up)  # taps per polyphase branch
        h = np.pad(h, (0, self._q * self.up - len(h)))
        self._branches = h.reshape(self._q, self.up).T.copy()  # (up, Q): branch[p, q] = h[p + up*q]
        self._buf = np.zeros(self._q, np.float64)  # inputs from index self._i0 on (zeros before the start)
        self._i0 = -self._q

    def push(self, x: np.ndarray) -> np.ndarray:
        """Add input samples; returns the output samples that are now complete (float32)."""
        x = np.asarray(x, dtype=np.float64).ravel()
        self.n_in += len(x)
        if self.up == self.down == 1:
            self.n_out += len(x)
            return x.astype(np.float32)
        self._buf = np.concatenate([self._buf, x])
        # output j needs inputs up to floor((j + pre) * down / up)
        last = (self.n_in - 1) * self.up // self.down - self._pre if self.n_in else -1
        return self._emit(last + 1)

    def flush(self) -> np.ndarray:
        """End of input: the remaining outputs (``ceil(n_in * up / down)`` in all), zeros assumed beyond."""
        if self.up == self.down == 1:
            return np.empty(0, np.float32)
        total = -(-self.n_in * self.up // self.down)
        self._buf = np.concatenate([self._buf, np.zeros(self._q + 1)])
        return self._emit(total)

    def _emit(self, stop: int) -> np.ndarray:
        parts = []
        while self.n_out < stop:
            j = np.arange(self.n_out, min(stop, self.n_out + 4096))
            t = (j + self._pre) * self.down
            phase = t % self.up
            base = (t - phase) // self.up - self._i0  # buffer index of the q = 0 input
            idx = base[:, None] - np.arange(self._q)[None, :]
            parts.append(np.einsum("jq,jq->j", self._branches[phase], self._buf[idx]))
            self.n_out += len(j)
        # keep only the history that later outputs can still reach
        t_next = (self.n_out + self._pre) * self.down
        first = (t_next - t_next % self.up) // self.up - self._q + 1 - self._i0
        if first > 0:
            self._buf = self._buf[first:].copy()
            self._i0 += first
        return np.concatenate(parts).astype(np.float32) if parts else np.empty(0, np.float32)
