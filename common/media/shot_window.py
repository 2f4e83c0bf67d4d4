"""The analysed frames a streaming shot detector keeps, addressed by sample index, and the cuts among them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fedge.common.media.frame_features import FrameFeatures, PairScores

__all__ = ["STEADY_MAX", "Sample", "ShotWindow"]

STEADY_MAX = 0.35  # a step whose compensated struct distance is below this is camera motion within a shot


@dataclass
class Sample:
    """One analysed frame: its index in the video, its features and the cues of the step into it."""

    frame: int
    feat: FrameFeatures
    step: PairScores | None  # cues from the previous sample to this one
    jump: float | None = None  # computed once the motion after it is known
    hstep: float = 0.0  # hist_distance from the previous sample


class ShotWindow:
    """The last ``maxlen`` samples of a stream by sample index (0: the first pushed), and the samples where
    shots start (0, then each decided cut)."""

    def __init__(self, maxlen: int) -> None:
        self._buf: deque[Sample] = deque(maxlen=maxlen)
        self.n = 0  # samples pushed
        self.cuts: list[int] = [0]

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def maxlen(self) -> int:
        """Most samples held (memory is bounded by it)."""
        return self._buf.maxlen  # type: ignore[return-value]

    @property
    def oldest(self) -> int:
        """Index of the oldest sample still held."""
        return self.n - len(self._buf)

    @property
    def last(self) -> Sample | None:
        """The newest sample (None before the first)."""
        return self._buf[-1] if self._buf else None

    def push(self, sample: Sample) -> None:
        self._buf.append(sample)
        self.n += 1

    def get(self, i: int) -> Sample | None:
        """Sample ``i``, or None when it is not held (dropped, or not pushed yet)."""
        j = i - (self.n - len(self._buf))
        return self._buf[j] if 0 <= j < len(self._buf) else None

    def shot_start(self, i: int) -> int:
        """Sample where the shot containing sample i starts (last cut at or before i)."""
        return max(c for c in self.cuts if c <= i) if any(c <= i for c in self.cuts) else 0

    def cut_between(self, a: int, b: int) -> bool:
        """A decided cut at a sample in (a, b]."""
        return any(a < c <= b for c in self.cuts)
