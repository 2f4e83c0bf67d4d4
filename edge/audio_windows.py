"""Streaming log-mel of one audio source with random access to recent windows (the ingest's audio side).

Features are computed as the source is read (:class:`fedge.common.media.audio.MelStream`); a window's dB are
``power_to_db(mel, ref=1, top_db)`` of that window alone (a stream has no global maximum). The noise floor of
:mod:`fedge.edge.align` follows the recent frames, so that a shot's windows are chosen where the sound is.
"""

from __future__ import annotations

import numpy as np

from fedge.common.media.audio import MelStream, power_to_db
from fedge.common.media.mel import MelParams
from fedge.edge.align import NoiseFloor, choose_windows, frame_energy_db
from fedge.edge.audio_source import AudioSource

__all__ = ["AudioWindows", "Window"]

_FLOOR_S = 30.0  # seconds of recent frame energies that set the noise floor


Window = tuple[np.ndarray, np.ndarray, int]  # (dB (n_mels, frames), raw samples it covers, start frame)


class AudioWindows:
    """Streaming log-mel of one audio source with random access to recent windows."""

    def __init__(self, src: AudioSource, params: MelParams, frames: int, top_db: float | None) -> None:
        self.src, self.p, self.frames, self.top_db = src, params, frames, top_db
        self._chunks = src.chunks()
        self._stream = MelStream(params)
        self.mel = np.empty((params.n_mels, 0), np.float32)  # mel power, frames [base, base + width)
        self.base = 0
        self.raw = np.empty(0, np.float32)  # samples [raw_base, ...)
        self.raw_base = 0
        self.done = False
        self.floor = NoiseFloor(round(_FLOOR_S * params.sr / params.hop))

    @property
    def end(self) -> int:
        return self.base + self.mel.shape[1]

    def _pull(self) -> None:
        c = next(self._chunks, None)
        if c is None:
            new = self._stream.flush()
            self.done = True
        else:
            new = self._stream.push(c)
            self.raw = np.concatenate([self.raw, c])
        if new.shape[1]:
            self.mel = np.concatenate([self.mel, new], axis=1)
            self.floor.push(frame_energy_db(new))

    def _frame(self, t: float) -> int:
        return round(t * self.p.sr / self.p.hop)

    def _at(self, start: int) -> Window:
        m = self.mel[:, start - self.base : start - self.base + self.frames]
        db = power_to_db(m, ref=1.0, amin=1e-10, top_db=self.top_db).astype(np.float32)
        s0 = max(0, start * self.p.hop - self.p.n_fft // 2)
        s1 = (start + self.frames - 1) * self.p.hop + self.p.n_fft // 2
        raw = self.raw[max(0, s0 - self.raw_base) : max(0, s1 - self.raw_base)]
        return db, raw, start

    def window(self, t: float, *, clamp_end: bool = True) -> Window | None:
        """The window centred at ``t`` s, or None."""
        half = self.frames // 2
        c = self._frame(t)
        start = c - half
        while not self.done and self.end < start + self.frames:
            self._pull()
        if self.done and clamp_end:
            start = min(start, self.end - self.frames)
        start = max(start, 0)
        if start < self.base or start + self.frames > self.end or abs(c - (start + half)) > half:
            return None
        return self._at(start)

    def span(self, t0: float, t1: float, max_windows: int, *, clamp_end: bool = True) -> list[Window]:
        """The windows inside the span ``[t0, t1)`` s where the sound is (:func:`fedge.edge.align.choose_windows`);
        a span shorter than a window (or with too little audio) gives the window centred on it, if any."""
        a, b = max(self._frame(t0), self.base), self._frame(t1)
        while not self.done and self.end < b:
            self._pull()
        b = min(b, self.end)
        if b - a <= self.frames:
            w = self.window((t0 + t1) / 2, clamp_end=clamp_end)
            return [] if w is None else [w]
        energy = frame_energy_db(self.mel[:, a - self.base : b - self.base])
        starts = choose_windows(energy, frames=self.frames, threshold=self.floor.threshold(),
                                max_windows=max_windows)
        return [self._at(a + k) for k in starts]

    def release_before(self, frame: int) -> None:
        """Forget features before ``frame`` and the samples they need."""
        drop = min(max(0, frame - self.base), self.mel.shape[1])
        if drop:
            self.mel = self.mel[:, drop:].copy()
            self.base += drop
        first_sample = max(0, self.base * self.p.hop - self.p.n_fft // 2)
        cut = min(max(0, first_sample - self.raw_base), len(self.raw))
        if cut:
            self.raw = self.raw[cut:].copy()
            self.raw_base += cut

    def drain(self) -> None:
        """Read the rest of the source (to count its seconds and see its errors)."""
        while not self.done:
            self._pull()
            self.release_before(self.end)
