"""Synthetic edited video with known shot boundaries: shots cut from still images, moved, joined by transitions.

Pure NumPy/OpenCV frame generation (no files): tests and ``benchmarks/keyframes.py`` write the frames with
``cv2.VideoWriter``. A shot is a virtual camera over a still image (static, pan, zoom, shake) with optional
sensor noise, an object sliding across, brightness spikes (flashes) and a dark, low-contrast grade. Shots are
joined by hard cuts, dissolves, fades through black or wipes; :func:`render` returns the ground truth as
:class:`Transition` records (frame ranges, 0-based, PySceneDetect's convention: a hard cut is the first frame
of the new shot).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["Shot", "Transition", "iter_render", "match", "render", "texture"]


@dataclass(frozen=True)
class Shot:
    """One shot: a virtual camera over ``image`` (BGR uint8) for ``frames`` frames.

    Attributes
    ----------
    center : (float, float)
        Start of the view centre, as fractions of the image (x, y).
    zoom : float
        Start magnification: 1.0 shows the largest view of the output's aspect that fits the image.
    pan : (float, float)
        View-centre velocity in output pixels per frame (x, y).
    zoom_rate : float
        Relative zoom change per frame (0.01 = 1 % closer each frame).
    shake : float
        Standard deviation of a random per-frame jitter, output pixels.
    noise : float
        Gaussian sensor noise, grey levels.
    grade : (float, float)
        ``out = offset + gain * in``: e.g. (8, 0.12) for a dark, low-contrast shot.
    sprite : np.ndarray | None
        An object (BGR) that slides across the frame at ``sprite_speed`` pixels per frame.
    flashes : tuple[int, ...]
        Frames (relative to the shot start) where a flash starts; each lasts ``flash_len`` frames.
    """

    image: np.ndarray
    frames: int
    center: tuple[float, float] = (0.5, 0.5)
    zoom: float = 1.0
    pan: tuple[float, float] = (0.0, 0.0)
    zoom_rate: float = 0.0
    shake: float = 0.0
    noise: float = 0.0
    grade: tuple[float, float] = (0.0, 1.0)
    sprite: np.ndarray | None = field(default=None, repr=False)
    sprite_speed: float = 3.0
    flashes: tuple[int, ...] = ()
    flash_len: int = 1


@dataclass(frozen=True)
class Transition:
    """Ground truth: frames ``start..end`` (inclusive) belong to a transition of ``kind``.

    A hard cut has ``start == end ==`` the first frame of the new shot.
    """

    kind: str  # "cut" | "dissolve" | "fade" | "wipe"
    start: int
    end: int


def texture(rng: np.random.Generator, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A random, smooth colour texture (BGR uint8) to stand in for a photo in unit tests."""
    h, w = size
    base = rng.random((h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    detail = cv2.resize(rng.random((h // 4, w // 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    img = 0.7 * img + 0.3 * detail
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    return (img * 255).astype(np.uint8)


def _view(shot: Shot, t: int, size: tuple[int, int], jitter: np.ndarray) -> np.ndarray:
    w, h = size
    ih, iw = shot.image.shape[:2]
    fit = min(iw / w, ih / h)  # source pixels per output pixel at zoom 1
    zoom = shot.zoom * (1.0 + shot.zoom_rate) ** t
    s = fit / zoom
    cx = shot.center[0] * iw + (shot.pan[0] * t + jitter[0]) * s
    cy = shot.center[1] * ih + (shot.pan[1] * t + jitter[1]) * s
    # output (u, v) -> source (cx + (u - w/2) s, cy + (v - h/2) s)
    m = np.array([[s, 0, cx - w / 2 * s], [0, s, cy - h / 2 * s]], dtype=np.float32)
    return cv2.warpAffine(shot.image, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def _shot_frames(shot: Shot, size: tuple[int, int], rng: np.random.Generator) -> Iterator[np.ndarray]:
    w, h = size
    flash: set[int] = set()
    for f in shot.flashes:
        flash.update(range(f, f + shot.flash_len))
    for t in range(shot.frames):
        jitter = rng.normal(0, shot.shake, 2) if shot.shake else np.zeros(2)
        img = _view(shot, t, size, jitter).astype(np.float32)
        if shot.sprite is not None:
            sh, sw = shot.sprite.shape[:2]
            x = round(-sw + shot.sprite_speed * t) % (w + sw) - sw
            y = (h - sh) // 2
            x0, x1 = max(0, x), min(w, x + sw)
            if x1 > x0:
                img[y:y + sh, x0:x1] = shot.sprite[:, x0 - x:x1 - x]
        img = shot.grade[0] + shot.grade[1] * img
        if t in flash:
            img = img * 1.8 + 90.0
        if shot.noise:
            img = img + rng.normal(0, shot.noise, img.shape).astype(np.float32)
        yield _u8(img)


def render(
    shots: list[Shot],
    joins: list[tuple[str, int]],
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
) -> tuple[list[np.ndarray], list[Transition]]:
    """Render a whole edit into memory (small test videos); see :func:`iter_render`."""
    truth: list[Transition] = []
    frames = list(iter_render(shots, joins, size, seed, truth))
    return frames, truth


def iter_render(
    shots: list[Shot],
    joins: list[tuple[str, int]],
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
    truth: list[Transition] | None = None,
) -> Iterator[np.ndarray]:
    """Yield the frames of shots joined by ``joins[i] = (kind, length)`` between shot i and i+1.

    ``kind`` is "cut" (length ignored), "dissolve", "fade" (through black) or "wipe" (left to right). A
    transition of length L overlaps the last L frames of one shot with the first L of the next. Only one shot
    is held in memory at a time. Ground truth is appended to ``truth`` (one :class:`Transition` per join).

    Yields
    ------
    np.ndarray
        (h, w, 3) uint8 BGR frames.
    """
    if len(joins) != len(shots) - 1:
        raise ValueError("need exactly one join between consecutive shots")
    truth = [] if truth is None else truth
    rng = np.random.default_rng(seed)
    w, _h = size
    n = 0
    tail: list[np.ndarray] = []  # frames of the current shot not yet written (kept for an overlap)
    for k, shot in enumerate(shots):
        frames = list(_shot_frames(shot, size, rng))
        if k > 0:
            kind, length = joins[k - 1]
            length = 0 if kind == "cut" else min(length, len(tail), len(frames))
            if length < 2:  # a neighbouring shot too short to overlap: it becomes a hard cut
                kind, length = "cut", 0
            keep = len(tail) - length
            for f in tail[:keep]:
                yield _u8(f)
            n += keep
            if kind == "cut":
                truth.append(Transition("cut", n, n))
            else:
                a_part, b_part = tail[keep:], frames[:length]
                for j in range(length):
                    p = (j + 1) / (length + 1)
                    a, b = a_part[j].astype(np.float32), b_part[j].astype(np.float32)
                    if kind == "dissolve":
                        mix = (1 - p) * a + p * b
                    elif kind == "fade":
                        mix = a * max(0.0, 1 - 2 * p) if p < 0.5 else b * max(0.0, 2 * p - 1)
                    elif kind == "wipe":
                        edge = round(p * w)
                        mix = b.copy()
                        mix[:, edge:] = a[:, edge:]
                    else:
                        raise ValueError(f"unknown transition kind {kind!r}")
                    yield _u8(mix)
                truth.append(Transition(kind, n, n + length - 1))
                n += length
                frames = frames[length:]
        tail = frames
    for f in tail:
        yield _u8(f)


def _u8(f: np.ndarray) -> np.ndarray:
    return f if f.dtype == np.uint8 else np.clip(f, 0, 255).astype(np.uint8)


def match(truth: list[Transition], detected: list[int], tol: int = 2) -> tuple[int, int, int]:
    """Count (true positives, false positives, false negatives) of detected boundary frames.

    A hard cut is found by a detection within ``tol`` frames of it; a gradual transition by one anywhere in
    ``[start - tol, end + tol]``. Each truth and each detection is used at most once (greedy, nearest first).
    """
    pairs = []
    for ti, t in enumerate(truth):
        for di, d in enumerate(detected):
            if t.start - tol <= d <= t.end + tol:
                centre = (t.start + t.end) / 2
                pairs.append((abs(d - centre), ti, di))
    used_t: set[int] = set()
    used_d: set[int] = set()
    for _, ti, di in sorted(pairs):
        if ti not in used_t and di not in used_d:
            used_t.add(ti)
            used_d.add(di)
    tp = len(used_t)
    return tp, len(detected) - tp, len(truth) - tp
