"""Log-mel spectrogram and MFCC in NumPy, following librosa's conventions; offline and streaming.

Pure numerics: no I/O, no librosa at run time. Parameter names and defaults of the helper functions follow
librosa 0.11 (``melspectrogram``, ``power_to_db``, ``mfcc``) so that a reader can check one against the other;
the STFT and mel parameters, the filterbank and the block kernel are in :mod:`fedge.common.media.mel`. Frames are
strided views of the signal (only the two padded ends are copies); the dB conversion of :func:`logmel` works
in place; the DCT matrix is computed once per size.

Why blocks: offline and streaming computation run the very same kernel on the very same blocks of frames
(block ``j`` always holds frames ``[j*BLOCK, (j+1)*BLOCK)``), so a stream fed in chunks of any size returns
exactly, bit for bit, what the offline function returns. Global operations (``ref=np.max``, ``top_db``) cannot
be applied to a stream before it ends; :func:`power_to_db` applies them to any window afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import as_strided

from fedge.common.media.mel import BLOCK, MelParams, dct_matrix, mel_kernel

__all__ = ["MelStream", "logmel", "mel_power", "mfcc", "mfcc_from_db", "power_to_db"]

_DEFAULT = MelParams()  # fedge's audio input (frozen, so one instance serves every default)


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
def mel_power(y: np.ndarray, params: MelParams = _DEFAULT) -> np.ndarray:
    """Mel spectrogram (power ``params.power``) of a mono signal: (n,) -> (n_mels, T) float32.

    Same result as ``librosa.feature.melspectrogram`` with the same parameters (to float32 rounding).
    Raises ``ValueError`` for non-finite samples or a signal too short for one frame.
    """
    y = _check_signal(y, finite=False)  # checked block by block below, while each block is in cache
    k = mel_kernel(params)
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
    params: MelParams = _DEFAULT,
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
    params: MelParams = _DEFAULT,
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

    def __init__(self, params: MelParams = _DEFAULT) -> None:
        self.params = params
        self._k = mel_kernel(params)
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

