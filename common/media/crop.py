"""Salient crop of a keyframe: the square around the detailed region (a card, a sign) before the model's resize.

The model sees keyframes at a few dozen pixels. When the object of interest fills only part of the frame (a card
held at arm's length in a room), resizing the whole frame spends most of those pixels on the scene. This module
finds the region where the fine detail is and returns a square box around it; pure OpenCV/NumPy, no I/O.

Detail map: the gradient magnitude of the grey frame at the frame's own scale (Sobel on a copy resized to
:data:`WORK_SIDE` pixels), minus its low-pass version so smooth shading and blotchy backgrounds do not count, and only where it stands
far above the frame's typical gradient (:data:`NOISE_K` times its median: sensor noise and fine texture
everywhere do not count either).
The box is the smallest rectangle holding ``mass`` (default 98 %) of the detail, taken from the cumulative sums
along each axis, squared up, padded by ``pad`` of its side and kept inside the frame. Conservative on purpose,
the whole frame is used when the detail is spread over it (a natural scene, or a card that already fills it:
the box would cover more than ``max_fraction`` of the frame's area) or reaches the frame's edge (within
:data:`EDGE_MARGIN`: an object the frame cuts, whose sharpest edges are often the cut itself).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["WORK_SIDE", "crop_salient", "salient_box"]

WORK_SIDE = 64  # the detail map is computed at this size: cheap, and fine enough for a box
EDGE_MARGIN = 0.04  # detail this close to the frame's edge (fraction of its side) means: do not crop
NOISE_K = 2.0  # detail counts where it exceeds this many times the frame's median gradient magnitude


def _span(profile: np.ndarray, mass: float) -> tuple[float, float]:
    """Fractions [a, b) of an axis holding the central ``mass`` of a non-negative profile."""
    c = np.cumsum(profile, dtype=np.float64)
    total = c[-1]
    if total <= 0:
        return 0.0, 1.0
    tail = (1.0 - mass) / 2.0 * total
    a = int(np.searchsorted(c, tail, side="left"))
    b = int(np.searchsorted(c, total - tail, side="left")) + 1
    n = len(profile)
    return a / n, min(b, n) / n


def salient_box(image: np.ndarray, *, mass: float = 0.98, pad: float = 0.12,
                max_fraction: float = 0.6) -> tuple[int, int, int, int]:
    """Box ``(x0, y0, x1, y1)`` (pixels, end-exclusive) of the detailed region of ``image`` (H, W[, 3]) uint8.

    Returns the whole frame when the detail is spread out (the squared, padded box would cover more than
    ``max_fraction`` of the frame's area) or the frame is flat.
    """
    h, w = image.shape[:2]
    full = (0, 0, w, h)
    if h < 8 or w < 8:
        return full
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    gx = cv2.Sobel(small, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(small, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy)
    detail = np.clip(mag - cv2.blur(mag, (15, 15)), 0, None)  # fine detail only: shading and blotches cancel
    # sensor noise and texture give every pixel some detail: keep what stands far above the frame's typical level
    detail = np.where(detail > NOISE_K * float(np.median(mag)), detail, 0.0)
    x0, x1 = _span(detail.sum(axis=0), mass)
    y0, y1 = _span(detail.sum(axis=1), mass)
    if min(x0, y0) < EDGE_MARGIN or max(x1, y1) > 1.0 - EDGE_MARGIN:
        return full  # the detail runs into the frame's edge: an object cut by the frame, or a scene
    cx, cy = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h
    side = max((x1 - x0) * w, (y1 - y0) * h) * (1 + 2 * pad)
    side = min(side, float(min(w, h)))
    if side * side > max_fraction * w * h or side < 4:
        return full
    bx0 = round(min(max(cx - side / 2, 0.0), w - side))
    by0 = round(min(max(cy - side / 2, 0.0), h - side))
    s = round(side)
    return bx0, by0, bx0 + s, by0 + s


def crop_salient(image: np.ndarray, **options: float) -> np.ndarray:
    """``image`` cut to :func:`salient_box` (the whole frame when nothing stands out)."""
    x0, y0, x1, y1 = salient_box(image, **options)
    return image[y0:y1, x0:x1]
