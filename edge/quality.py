"""The quality gate of the edge data path: modality detection, per-modality checks, accept / clean / reject.

For each candidate sample the gate looks at the modalities it carries (a keyframe, an audio window, or
both) and checks each: a keyframe can be ``blurred`` (Laplacian variance below ``blur_min``), ``dark`` or
``overexposed`` (too many crushed / blown pixels), or a ``duplicate`` of a recently kept keyframe (pHash
Hamming distance <= ``dup_max_hamming``); an audio window can be ``silent`` (RMS below ``silence_dbfs``;
``silent-shot`` when the window is the loudest of its shot, so the whole shot is silent) or ``clipped`` (more
than ``max_clipped`` of its samples at full scale). A failing modality is removed from the
sample (cleaned); a sample left with no modality is rejected. Every removal is counted under
``"<modality>:<reason>"``; the scores of what is kept go to the store and, from there, to the model's router.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from fedge.common.config import MODALITIES
from fedge.common.media.quality import (
    audio_score,
    audio_stats,
    hamming,
    image_score,
    image_stats,
    phash,
)

__all__ = ["GateResult", "QualityGate", "detect_modalities"]


def detect_modalities(*, image: np.ndarray | None, audio: np.ndarray | None) -> tuple[str, ...]:
    """Modalities a candidate sample carries, in :data:`fedge.common.config.MODALITIES` order."""
    present = {"image": image is not None and image.size > 0, "audio": audio is not None and audio.size > 0}
    return tuple(m for m in MODALITIES if present[m])


@dataclass(frozen=True)
class GateResult:
    """What the gate decided for one candidate sample."""

    modalities: tuple[str, ...]  # kept modalities (empty: rejected)
    quality: tuple[float, float]  # (image, audio) scores in [0, 1]; 0 for a modality not kept
    reasons: tuple[str, ...]  # "<modality>:<reason>" for each modality removed
    phash: int | None = None  # of the keyframe, when it has one

    @property
    def accepted(self) -> bool:
        return bool(self.modalities)


@dataclass
class QualityGate:
    """Stateful gate (it remembers the hashes of the last ``dup_memory`` kept keyframes).

    Parameters are flat keyword arguments with defaults that suit 8-bit keyframes of a few hundred pixels and
    float audio at full scale 1.0.
    """

    blur_min: float = 15.0
    max_dark: float = 0.9
    max_bright: float = 0.9
    dup_max_hamming: int = 4
    dup_memory: int = 64
    silence_dbfs: float = -60.0
    max_clipped: float = 0.01
    counts: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    rejected: int = 0
    _recent: deque[int] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        for k in ("max_dark", "max_bright", "max_clipped"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"quality gate '{k}' must be in [0, 1]")
        if self.blur_min < 0 or self.dup_max_hamming < 0 or self.dup_memory < 0:
            raise ValueError("quality gate 'blur_min', 'dup_max_hamming' and 'dup_memory' must be >= 0")

    def check_image(self, rgb: np.ndarray) -> tuple[str | None, float, int]:
        """(reason or None, score, pHash) of a keyframe; does not update the duplicate memory."""
        s = image_stats(rgb)
        h = phash(rgb)
        score = image_score(s, blur_min=max(self.blur_min, 1e-6), max_exposed=min(self.max_dark, self.max_bright))
        if s.dark_fraction > self.max_dark:
            return "dark", score, h
        if s.bright_fraction > self.max_bright:
            return "overexposed", score, h
        if s.sharpness < self.blur_min:
            return "blurred", score, h
        if any(hamming(h, r) <= self.dup_max_hamming for r in self._recent):
            return "duplicate", score, h
        return None, score, h

    def check_audio(self, samples: np.ndarray) -> tuple[str | None, float]:
        """(reason or None, score) of an audio window (raw mono samples at full scale 1.0)."""
        s = audio_stats(samples)
        score = audio_score(s, silence_dbfs=self.silence_dbfs, max_clipped=self.max_clipped)
        if not s.rms_dbfs >= self.silence_dbfs:
            return "silent", score
        if s.clip_fraction > self.max_clipped:
            return "clipped", score
        return None, score

    def assess(self, *, image: np.ndarray | None = None, audio: np.ndarray | None = None,
               audio_is_loudest_of_shot: bool = False) -> GateResult:
        """Check every modality present, clean failing ones, count, and remember a kept keyframe's hash.

        ``audio_is_loudest_of_shot``: the window is the loudest of its shot, so a silent one means a silent
        shot (reason ``silent-shot``).
        """
        kept: list[str] = []
        reasons: list[str] = []
        q = {"image": 0.0, "audio": 0.0}
        h: int | None = None
        for m in detect_modalities(image=image, audio=audio):
            if m == "image":
                assert image is not None
                reason, score, h = self.check_image(image)
            else:
                assert audio is not None
                reason, score = self.check_audio(audio)
                if reason == "silent" and audio_is_loudest_of_shot:
                    reason = "silent-shot"
            if reason is None:
                kept.append(m)
                q[m] = score
            else:
                reasons.append(f"{m}:{reason}")
        self.counts.update(reasons)
        if "image" in kept and h is not None and self.dup_memory:
            self._recent.append(h)
            while len(self._recent) > self.dup_memory:
                self._recent.popleft()
        if kept:
            self.accepted += 1
        else:
            self.rejected += 1
        return GateResult(tuple(kept), (q["image"], q["audio"]), tuple(reasons), h)
