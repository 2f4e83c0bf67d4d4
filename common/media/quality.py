"""Quality measures of keyframes and audio windows, and their scores in [0, 1] (pure NumPy/SciPy, no I/O).

Images: sharpness as the variance of the 4-neighbour Laplacian of the grey image (Pech-Pacheco et al.),
exposure as mean luminance and the fractions of crushed shadows / blown highlights, and a 64-bit DCT
perceptual hash (pHash: 32x32 grey, 2-D DCT-II, the 8x8 lowest frequencies without DC against their median)
whose Hamming distance finds near-duplicates. Audio: RMS level in dBFS and the fraction of clipped samples.

The scores feed the model's router as ``quality`` (B, 2) in [0, 1] (common/model.py): 1 is clean, 0 useless.
Thresholds live in the edge gate (edge/quality.py); the cloud's curation can reuse the same measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

__all__ = [
    "AudioStats",
    "ImageStats",
    "audio_score",
    "audio_stats",
    "hamming",
    "image_score",
    "image_stats",
    "laplacian_variance",
    "phash",
    "to_gray",
]

DARK_LEVEL = 16  # 8-bit luminance at or below this is crushed shadow
BRIGHT_LEVEL = 239  # at or above this, blown highlight
CLIP_LEVEL = 0.999  # |sample| at or above this (full scale 1.0) is clipped


@dataclass(frozen=True)
class ImageStats:
    """Measures of one keyframe."""

    sharpness: float  # variance of the Laplacian of the grey image (8-bit scale)
    brightness: float  # mean luminance, 0..255
    dark_fraction: float  # pixels <= DARK_LEVEL
    bright_fraction: float  # pixels >= BRIGHT_LEVEL


@dataclass(frozen=True)
class AudioStats:
    """Measures of one audio window."""

    rms_dbfs: float  # RMS level relative to full scale (a full-scale sine is -3 dBFS); -inf for digital silence
    peak: float  # max |sample|
    clip_fraction: float  # samples with |x| >= CLIP_LEVEL


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (H, W) float32 luminance 0..255 (ITU-R BT.601 weights, as OpenCV)."""
    if rgb.ndim == 2:
        return rgb.astype(np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    x = rgb.astype(np.float32)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels: low for blurred images."""
    g = np.asarray(gray, dtype=np.float32)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var(dtype=np.float64))


def image_stats(rgb: np.ndarray) -> ImageStats:
    """Sharpness and exposure of an RGB uint8 image."""
    g = to_gray(rgb)
    n = g.size
    return ImageStats(
        sharpness=laplacian_variance(g),
        brightness=float(g.mean(dtype=np.float64)),
        dark_fraction=float(np.count_nonzero(g <= DARK_LEVEL)) / n,
        bright_fraction=float(np.count_nonzero(g >= BRIGHT_LEVEL)) / n,
    )


def _resize_area(g: np.ndarray, size: int) -> np.ndarray:
    """Box-filter (area average) resize of a 2-D array to (size, size); small inputs are first repeated."""
    h, w = g.shape
    if h < size:
        g = np.repeat(g, -(-size // h), axis=0)
    if w < size:
        g = np.repeat(g, -(-size // w), axis=1)
    h, w = g.shape
    ys = (np.arange(size + 1) * h) // size
    xs = (np.arange(size + 1) * w) // size
    c = np.zeros((h + 1, w + 1), np.float64)
    c[1:, 1:] = g.astype(np.float64).cumsum(0).cumsum(1)  # integral image: each box sum in O(1)
    s = c[ys[1:]][:, xs[1:]] - c[ys[:-1]][:, xs[1:]] - c[ys[1:]][:, xs[:-1]] + c[ys[:-1]][:, xs[:-1]]
    return s / (np.diff(ys)[:, None] * np.diff(xs)[None, :])


def phash(rgb: np.ndarray, *, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """64-bit perceptual hash (DCT pHash) of an image: robust to rescaling, compression and small noise."""
    g = to_gray(rgb)
    n = hash_size * highfreq_factor
    small = _resize_area(g, n)
    d = scipy.fft.dctn(small, type=2, norm="ortho")[:hash_size, :hash_size].ravel()
    low = d[1:]  # without DC: the hash ignores overall brightness
    bits = np.concatenate([[d[0] > np.median(low)], low > np.median(low)])
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes."""
    return int(((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count())


def audio_stats(y: np.ndarray) -> AudioStats:
    """Level and clipping of a mono window (float, full scale 1.0)."""
    x = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return AudioStats(rms_dbfs=float("-inf"), peak=0.0, clip_fraction=0.0)
    ms = float(np.mean(x * x))
    return AudioStats(
        rms_dbfs=10.0 * np.log10(ms) if ms > 0 else float("-inf"),
        peak=float(np.max(np.abs(x))),
        clip_fraction=float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) / x.size,
    )


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi``, linear between, clipped."""
    if not np.isfinite(x):
        return 0.0 if x < 0 else 1.0
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def image_score(s: ImageStats, *, blur_min: float = 30.0, max_exposed: float = 0.6) -> float:
    """Quality in [0, 1]: sharpness (log scale, 0 at ``blur_min / 4``, 1 at ``4 * blur_min``) times exposure
    (1 minus the larger of the dark and bright fractions, reaching 0 at ``max_exposed`` + 0.4)."""
    sharp = _ramp(np.log10(max(s.sharpness, 1e-6)), np.log10(blur_min / 4), np.log10(blur_min * 4))
    worst = max(s.dark_fraction, s.bright_fraction)
    exposure = 1.0 - _ramp(worst, max_exposed - 0.4, max_exposed + 0.4)
    return sharp * exposure


def audio_score(s: AudioStats, *, silence_dbfs: float = -60.0, max_clipped: float = 0.01) -> float:
    """Quality in [0, 1]: level (0 at ``silence_dbfs``, 1 at 30 dB above it) times the unclipped share
    (1 without clipping, 0 at twice ``max_clipped``)."""
    level = _ramp(s.rms_dbfs, silence_dbfs, silence_dbfs + 30.0)
    clip = 1.0 - _ramp(s.clip_fraction, 0.0, 2 * max_clipped)
    return level * clip
