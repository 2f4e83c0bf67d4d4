"""Shot-level audio alignment: where in a shot's time span the sound is.

A keyframe is chosen for its picture, so the instant it shows may lie away from what is said during its shot.
These pure functions choose the audio windows of a shot from the shot's whole span instead: the loudest
window, plus (up to a bound) one window per further separate sound. "Sound" is frame energy above a noise
floor that the stream itself sets: a low quantile of the recent frames' energies (the background, which any
real recording has between sounds), plus a margin of a few of the background's own deviations, estimated from
the lower tail of the same distribution. No absolute level is assumed: a quiet room, a 10 dB SNR street and a
digitally silent track each set their own floor.

Arrays are per feature frame (hop ``p.hop`` samples): energies ``(T,)`` in dB, mel power ``(n_mels, T)``.
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["NoiseFloor", "active_segments", "choose_windows", "frame_energy_db", "window_power"]

_EPS = 1e-12  # power floor of the dB conversion (-120 dB: digital silence)
FLOOR_QUANTILE = 0.10  # the background: at least this share of any stretch of recording is between sounds
TAIL_QUANTILE = 0.01  # with FLOOR_QUANTILE, the lower tail that gives the background's spread
_Z_GAP = 2.326 - 1.282  # standard-normal quantiles 0.99 - 0.90: tail width of a unit spread
MARGIN_SIGMAS = 4.0  # active: this many background deviations above the floor ...
MIN_MARGIN_DB = 3.0  # ... and at least twice the floor's power (a perfectly steady background has no spread)


def frame_energy_db(mel: np.ndarray) -> np.ndarray:
    """Broadband energy (T,) in dB of mel power frames (n_mels, T)."""
    return (10.0 * np.log10(np.asarray(mel, np.float64).sum(axis=0) + _EPS)).astype(np.float32)


class NoiseFloor:
    """Streaming estimate of a stream's background level and of the threshold of "sound" above it.

    Keeps the energies of the last ``history`` frames (bounded memory); :meth:`threshold` is
    ``q10 + max(4 sigma, 3 dB)`` with ``sigma = (q10 - q1) / 1.044`` (the spread of a Gaussian with that
    lower tail; a log-energy's lower tail is longer than a Gaussian's, which errs on the side of a higher
    threshold).
    """

    def __init__(self, history: int) -> None:
        if history < 1:
            raise ValueError("history must be >= 1 frame")
        self._e: deque[np.ndarray] = deque()
        self._n = 0
        self.history = history

    def push(self, energy_db: np.ndarray) -> None:
        """Add the energies of the next frames (in stream order)."""
        e = np.asarray(energy_db, np.float32).ravel()
        if not e.size:
            return
        self._e.append(e)
        self._n += e.size
        while self._e and self._n - self._e[0].size >= self.history:
            self._n -= self._e.popleft().size
        if self._n > self.history:  # trim the oldest chunk's head
            cut = self._n - self.history
            self._e[0] = self._e[0][cut:]
            self._n -= cut

    def __len__(self) -> int:
        return self._n

    def threshold(self) -> float:
        """Energy in dB above which a frame holds sound (``inf`` before any frame)."""
        if not self._n:
            return float("inf")
        lo, floor = np.quantile(np.concatenate(self._e), [TAIL_QUANTILE, FLOOR_QUANTILE])
        sigma = max(0.0, float(floor - lo)) / _Z_GAP
        return float(floor) + max(MARGIN_SIGMAS * sigma, MIN_MARGIN_DB)


def window_power(energy_db: np.ndarray, frames: int) -> np.ndarray:
    """Mean linear power of every window of ``frames`` consecutive frames: (T - frames + 1,), dB."""
    p = 10.0 ** (np.asarray(energy_db, np.float64) / 10.0)
    c = np.concatenate([[0.0], np.cumsum(p)])
    return 10.0 * np.log10((c[frames:] - c[:-frames]) / frames + _EPS)


def active_segments(energy_db: np.ndarray, threshold: float, *, min_gap: int, min_len: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of frames above ``threshold``; gaps shorter than ``min_gap`` frames are bridged (pauses
    inside one sound), runs shorter than ``min_len`` frames are dropped (clicks, noise peaks)."""
    on = np.asarray(energy_db) > threshold
    if not on.any():
        return []
    d = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    runs: list[list[int]] = []
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        if runs and a - runs[-1][1] < min_gap:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return [(a, b) for a, b in runs if b - a >= min_len]


def choose_windows(energy_db: np.ndarray, *, frames: int, threshold: float, max_windows: int = 1,
                   min_gap: int | None = None, min_len: int = 3) -> list[int]:
    """Start frames (sorted) of up to ``max_windows`` windows of ``frames`` frames inside a span.

    ``energy_db`` (T,) covers the span's candidate frames. The first window is the loudest one (whatever the
    threshold: when the span holds no sound, its loudest stretch is what the quality gate should judge).
    Each further window is the loudest window centred on a further separate sound (an active segment, see
    :func:`active_segments`; ``min_gap`` defaults to a quarter window) not yet mostly covered, and overlapping
    no chosen window by half or more. A span shorter than a window gives the one window starting at 0 (the
    caller pads or centres it).
    """
    if max_windows < 1 or frames < 1:
        raise ValueError("max_windows and frames must be >= 1")
    e = np.asarray(energy_db, np.float32)
    if e.size <= frames:
        return [0]
    score = window_power(e, frames)  # (S,) S = T - frames + 1
    chosen = [int(np.argmax(score))]
    if max_windows == 1:
        return chosen
    gap = max(1, frames // 4) if min_gap is None else min_gap
    segs = active_segments(e, threshold, min_gap=gap, min_len=min_len)
    cands = []
    for a, b in segs:
        # windows whose centre lies in the segment, as far as the span allows
        lo = min(max(0, a - frames // 2), score.size - 1)
        hi = min(max(lo + 1, b - frames // 2), score.size)
        k = lo + int(np.argmax(score[lo:hi]))
        cands.append((float(score[k]), k, a, b))
    for _, k, a, b in sorted(cands, reverse=True):
        if len(chosen) >= max_windows:
            break
        covered = max((min(b, c + frames) - max(a, c) for c in chosen), default=0)
        if covered * 2 >= b - a:
            continue  # this sound is (mostly) in a chosen window already
        if any(abs(k - c) * 2 < frames for c in chosen):
            continue
        chosen.append(k)
    return sorted(chosen)
