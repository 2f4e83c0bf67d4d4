"""Transition frames: is a middle frame a blend, a patchwork or a contrast dip of two ends (pure kernels)?

Gradual transitions (dissolves, fades through black, wipes) are recognised on triples of analysed frames
``(a, m, b)``: when ``a`` and ``b`` differ like two shots do and the middle frame ``m`` is, block by block, a
linear blend of ``a`` and ``b`` (least squares with a small residual, and a real share of both), ``m`` lies
inside a transition. A pan or a zoom also makes ``a`` and ``b`` differ, but its middle frame is a displaced
image, not a blend, so the fit fails. A fade through black passes through frames without contrast between two
different shots; a wipe frame is part one end, part the other, split by an edge. :func:`transition_fit` asks
all three questions; :mod:`fedge.common.media.gradual` looks for such triples in a stream.
"""

from __future__ import annotations

import cv2
import numpy as np

from fedge.common.media.frame_features import FrameFeatures, block_means

__all__ = ["DIP_RATIO", "blend_fit", "composite_fit", "is_blend", "is_composite", "transition_fit"]

DIP_RATIO = 0.5  # a frame with less than half the contrast of both sides is inside a fade
BLEND_MAX_RESIDUAL = 0.25  # unexplained fraction of the middle frame's block variance
BLEND_SHARE = (0.15, 0.85)  # the middle frame must hold a real share of both ends
BLEND_MAX_GAIN = 0.5  # both ends must explain at least half of what the better end alone leaves
COMPOSITE_MIN = 0.6  # a wipe frame: this fraction of the differing blocks match one end or the other


def composite_fit(a: np.ndarray, m: np.ndarray, b: np.ndarray, min_diff: float = 0.5) -> tuple[float, float]:
    """How much ``m`` is a patchwork of ``a`` and ``b`` (a wipe, a split screen growing): block by block.

    ``min_diff``: the mean absolute difference per pixel (in the arrays' units) above which a block of ``a``
    and ``b`` counts as different. Compare grey levels rather than per-frame normalised luma when the
    parts come from shots of different brightness: a wipe frame's contrast mixes both and normalises neither.

    Returns
    -------
    (explained, share)
        Over blocks where ``a`` and ``b`` differ: the fraction where ``m`` is much closer to one of them than
        they are to each other, and the fraction of those that match ``b``.
    """
    dab = block_means(cv2.absdiff(a, b))
    dam = block_means(cv2.absdiff(a, m))
    dbm = block_means(cv2.absdiff(b, m))
    informative = dab > min_diff  # e.g. blocks whose ends differ by half a standard deviation per pixel
    if informative.sum() < max(4, dab.size // 2):
        # two shots differ almost everywhere; ends that differ only here and there (stars passing by in a
        # pan over a night sky) would let any middle frame look like a patchwork
        return 0.0, 0.5
    near_a = (dam < 0.5 * dab) & informative
    near_b = (dbm < 0.5 * dab) & informative
    n = float(informative.sum())
    explained = float((near_a | near_b).sum()) / n * _separability(near_a, near_b)
    share = float(near_b.sum()) / max(1.0, float((near_a | near_b).sum()))
    return explained, share


def _separability(near_a: np.ndarray, near_b: np.ndarray) -> float:
    """Best fraction of labelled blocks that one horizontal or vertical line splits into a-side and b-side.

    A wipe (or a growing split screen) moves one edge across the frame; blocks that happen to match one end
    or the other all over the frame (sparse detail) do not line up on two sides of an edge.
    """
    best = 0.0
    labelled = near_a ^ near_b
    near_a, near_b = near_a & labelled, near_b & labelled
    total = float(labelled.sum())
    if total == 0:
        return 0.0
    for axis in (0, 1):
        ca = near_a.sum(axis=1 - axis) * 1.0  # labelled-a blocks per row (axis 0) or column (axis 1)
        cb = near_b.sum(axis=1 - axis) * 1.0
        for first, second in ((ca, cb), (cb, ca)):
            # split after position t: `first` should be before, `second` after
            good = np.cumsum(first) + (second.sum() - np.cumsum(second))
            best = max(best, float(good.max()) / total)
    return min(1.0, best)


def is_composite(fit: tuple[float, float]) -> bool:
    """A :func:`composite_fit` result that says: the middle frame is part one end, part the other."""
    explained, share = fit
    return explained >= COMPOSITE_MIN and BLEND_SHARE[0] <= share <= BLEND_SHARE[1]


def is_blend(fit: tuple[float, float, float]) -> bool:
    """A :func:`blend_fit` result that says: the middle frame is a genuine mix of both ends."""
    residual, share, gain = fit
    return residual <= BLEND_MAX_RESIDUAL and gain <= BLEND_MAX_GAIN and BLEND_SHARE[0] <= share <= BLEND_SHARE[1]


def blend_fit(a: np.ndarray, m: np.ndarray, b: np.ndarray, block: int = 8, scale_a: float = 1.0,
              scale_b: float = 1.0) -> tuple[float, float, float]:
    """How well ``m`` is, block by block, a linear blend ``alpha*a + beta*b + gamma`` of ``a`` and ``b``.

    Only blocks where ``a`` and ``b`` differ are informative (elsewhere any share fits). Blocks are 8x8 so
    that two free coefficients explain only ~3 % of a block's variance by chance. ``scale_a`` and ``scale_b``
    are the divisors that normalised ``a`` and ``b`` (their contrast): with them the share is the mixing
    weight in grey levels, the progress of a dissolve.

    Returns
    -------
    (residual, share, gain)
        ``residual``: unexplained fraction of ``m``'s block variance (0 = a perfect blend, 1 = no fit);
        ``gain``: ``residual`` divided by the residual of the better one-ended fit (small = both ends needed);
        ``share``: the mean over informative blocks of ``beta / (alpha + beta)`` (0 = all ``a``, 1 = all ``b``;
        a dissolve gives its progress, a wipe the area already wiped).
    """
    h, w = a.shape
    h2, w2 = h - h % block, w - w % block

    def blocks(x: np.ndarray) -> np.ndarray:  # (nblocks, block*block)
        x = x[:h2, :w2].reshape(h2 // block, block, w2 // block, block).swapaxes(1, 2)
        x = x.reshape(-1, block * block).astype(np.float64)
        return x - x.mean(axis=1, keepdims=True)  # the constant gamma absorbs block means

    A, M, B = blocks(a), blocks(m), blocks(b)
    saa, sbb, sab = (A * A).sum(1), (B * B).sum(1), (A * B).sum(1)
    sam, sbm, smm = (A * M).sum(1), (B * M).sum(1), (M * M).sum(1)
    diff = ((A - B) ** 2).sum(1)
    informative = diff > 0.25 * block * block  # the ends differ by > 0.5 std per pixel in this block
    if informative.sum() < 3:
        return 1.0, 0.5, 1.0
    det = saa * sbb - sab * sab
    ok = informative & (det > 1e-6 * (saa * sbb + 1e-12))
    if ok.sum() < 3:
        return 1.0, 0.5, 1.0
    alpha = (sam * sbb - sbm * sab)[ok] / det[ok]
    beta = (sbm * saa - sam * sab)[ok] / det[ok]
    explained = alpha * sam[ok] + beta * sbm[ok]
    total = float(smm[ok].sum())
    if total <= 1e-9:
        return 1.0, 0.5, 1.0
    residual = float(max(0.0, total - explained.sum()) / total)
    # the same fit with one end only: a blend needs both (noise alone is explained no better by two ends)
    r_a = float(max(0.0, total - (sam[ok] ** 2 / saa[ok]).sum()) / total)
    r_b = float(max(0.0, total - (sbm[ok] ** 2 / sbb[ok]).sum()) / total)
    gain = residual / max(min(r_a, r_b), 1e-9)
    # per-block share of b, averaged without contrast weighting (a flat image must not hide behind a busy one)
    # in grey levels (undo each frame's contrast normalisation) so that the share is the mixing weight
    pa, pb = np.clip(alpha, 0, None) / scale_a, np.clip(beta, 0, None) / scale_b
    share = float(np.mean(pb / np.maximum(pa + pb, 1e-9)))
    return residual, share, min(1.0, gain)


def _grey(f: FrameFeatures) -> np.ndarray:
    """The thumbnail in grey levels again (undo the contrast normalisation)."""
    return f.luma * np.float32(f.scale) + np.float32(f.mean)


def transition_fit(a: FrameFeatures, m: FrameFeatures, b: FrameFeatures) -> tuple[float, float, float] | None:
    """(residual, share, gain) when ``m`` is a transition frame between ``a`` and ``b``, else None.

    A transition frame is a linear blend of the ends (dissolve), a patchwork of them (wipe), or a frame
    without contrast between two frames that have it (fade through black or white).
    """
    if a.flat or b.flat:
        return None
    ratio = m.contrast / min(a.contrast, b.contrast)
    if m.flat or ratio < DIP_RATIO:  # a fade: the darkest frame in the middle ranks first
        return 0.0, 0.5 + 0.5 * min(ratio, 1.0), 0.0
    fit = blend_fit(a.luma, m.luma, b.luma, scale_a=a.scale, scale_b=b.scale)
    if is_blend(fit):
        return fit
    comp = composite_fit(_grey(a), _grey(m), _grey(b), min_diff=max(3.0, 0.5 * min(a.contrast, b.contrast)))
    if is_composite(comp):
        return 1.0 - comp[0], comp[1], 0.0
    return None
