"""Streaming polyphase resampling, equal to ``scipy.signal.resample_poly`` of the whole signal."""

from __future__ import annotations

import math

import numpy as np
import scipy.signal

__all__ = ["StreamResampler"]


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
