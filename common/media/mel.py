"""Mel scale, mel filterbank and the block kernel (window, FFT, mel projection) under :mod:`fedge.common.media.audio`.

Pure numerics, following librosa 0.11's names and conventions (``filters.mel``, ``mel_frequencies``).
:class:`MelParams` carries fedge's defaults (the model's audio input: 16 kHz, ``n_fft`` 512, hop 256, 40 mel
bands).

How the kernel is fast (single precision throughout, one thread): each block of :data:`BLOCK` frames is
windowed into one cache-sized buffer and transformed by ``cv2.dft`` (rows, real packed output; Intel IPP in the
opencv-python wheels, about 3x SciPy's pocketfft here; ``MelParams(fft="scipy")`` uses ``scipy.fft.rfft``); the
spectrum is squared in place and, for ``power=2``, ``re**2 + im**2`` and the mel sum are one float32 matrix
product with the filterbank expanded to the FFT's real/imaginary columns, split into runs of bands over the
columns they cover (the filterbank is mostly zeros). The filterbank and window are computed once per parameter
set. OpenCV is called on at most 65536 samples at a time, under its threshold for handing work to its thread
pool, so the features never use more than the calling thread (an edge device's other cores decode video).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import cv2
import numpy as np
import scipy.fft
import scipy.signal

__all__ = [
    "BLOCK",
    "MelKernel",
    "MelParams",
    "Norm",
    "dct_matrix",
    "hz_to_mel",
    "mel_filterbank",
    "mel_kernel",
    "mel_to_hz",
]

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


class MelKernel:
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
def mel_kernel(p: MelParams) -> MelKernel:
    """The kernel of ``p``, built once per parameter set."""
    return MelKernel(p)
