"""Shot-boundary detection: frame features, pair distances and an adaptive streaming detector (pure kernels).

Everything here works on arrays (OpenCV BGR frames in, numbers out): no files, no capture. The edge keyframe
extractor (``edge/keyframes.py``) feeds it decoded frames; the cloud's curation can feed it the same way.

How it decides, and why the thresholds are not tuned to any test video
----------------------------------------------------------------------
Each analysed frame is reduced to a 64-pixel-wide thumbnail (:func:`frame_features`):

* ``luma``: grey levels normalised to zero mean and unit standard deviation. A dark, low-contrast shot and a
  bright one then look alike, so a cut between two dark shots is as visible as a cut between bright ones.
  Frames with less than :data:`CONTRAST_FLOOR` grey levels of contrast (black frames in a fade, a lens cap)
  are not stretched: their "structure" would only be amplified sensor noise.
* ``hist``: a coarse hue x saturation histogram of the pixels that are not dark (8x4 bins + one for grey
  pixels): blind to motion and, unlike an RGB or value histogram, to fades, exposure changes and flashes.

Two consecutive analysed frames are compared by :func:`pair_scores` with three cues:

* ``hist``: half the L1 distance of the histograms, in [0, 1] = the fraction of pixels whose colour bin changed.
* ``struct``: a motion-compensated structural distance. The global translation between the thumbnails is
  estimated by phase correlation and undone, then the mean absolute luma difference is taken per block and the
  *median* block is reported. Compensation removes pans; the median ignores an object sliding over less than
  half the frame; normalised luma ignores exposure. Two unrelated images score about 1.1.
* ``shift``: the translation itself. A cut between two framings of the same scene (a reframe, a stereo pair)
  can look like a one-frame pan; unlike a pan, the jump is not continued by the frames around it.

:class:`ShotDetector` turns these per-step cues into cuts with an adaptive threshold: for each cue it takes
the median and MAD of the surrounding steps (about two seconds before, a few samples after) and calls a step a
cut when it is a robust outlier (z >= ``z``, default 6) *and* exceeds a small absolute floor that states what
a shot change means physically (e.g. at least 30 % of pixels change colour bin, or a structural change of a
third of what unrelated images give). The outlier test is what makes noise, fast pans and zooms harmless: they
raise the cue for many steps in a row, so the median and MAD rise with them. The floors only keep a perfectly
static synthetic shot (MAD near zero) from turning a tiny change into a cut.

Flashes: a step that fires is rejected when the frame before it and a frame at most ``flash_samples`` later
are again as similar as neighbouring frames of the shot usually are (or, symmetrically, when the spike ends
there): a brightness spike returns, a cut stays.

Gradual transitions (dissolves, fades through black, wipes) change little per step, so no single step is an
outlier. They are found with triples of analysed frames ``(a, m, b)`` at several spans: when ``a`` and ``b``
differ like two shots do and the middle frame ``m`` is, block by block, a linear blend of ``a`` and ``b``
(least squares with a small residual, and a real share of both), ``m`` lies inside a transition. A pan or a
zoom also makes ``a`` and ``b`` differ, but its middle frame is a displaced image, not a blend, so the fit
fails. A fade through black passes through frames without contrast between two different shots. Among the
accepted triples of one transition, the one whose blend is closest to half-and-half gives the boundary. A
span h is tried at every (h/2)-th end sample only: a transition that needs it lasts about 2h samples and still
gets several triples, and the wide spans (a motion-compensated distance each, in every moving shot) cost less.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "CONTRAST_FLOOR",
    "Boundary",
    "FrameFeatures",
    "PairScores",
    "ShotDetector",
    "blend_fit",
    "composite_fit",
    "detect_boundaries",
    "frame_features",
    "hist_distance",
    "is_blend",
    "is_composite",
    "pair_scores",
    "struct_distance",
    "thumbnail",
]

THUMB_WIDTH = 64
# Grey levels of contrast (std of the thumbnail) below which a frame has no visible structure (black, the
# bottom of a fade, a lens cap). Area-averaging to the thumbnail divides sensor noise by the decimation factor,
# so noise alone stays well under this; a dark, low-contrast shot (a few levels of std) stays above it.
CONTRAST_FLOOR = 1.5
# Hue x saturation bins of pixels that have a colour (V and S above _CHROMA_MIN), plus one bin for grey
# pixels; dark pixels are left out. Brightness changes (fades, exposure, flashes) barely move this histogram.
HIST_BINS = (8, 4)
LEVEL_BINS = 16
HIST_MIN_SHARE = 0.25  # the colour histogram needs at least this share of non-dark pixels
_CHROMA_MIN = 24
_GRID = 8  # blocks across the thumbnail for the median block difference

# What a shot change means physically (see the module docstring); the adaptive z-test does the real work.
CUT_MIN = {"hist": 0.30, "struct": 0.35, "jump": 0.04}
STEADY_MAX = 0.35  # a step whose compensated struct distance is below this is camera motion within a shot
# Spread floors for the z-test: the smallest MAD we trust (a static synthetic shot has MAD ~ 0).
SPREAD_FLOOR = {"hist": 0.02, "struct": 0.03, "jump": 0.006}
DIP_RATIO = 0.5  # a frame with less than half the contrast of both sides is inside a fade
RECENT_RATIO = 1.5  # a cut exceeds the shot's last two steps by this factor
HIST_GRADUAL_MIN = 0.3  # histogram change between the ends of a gradual transition (a cut's hist floor)
GRADUAL_MIN = 0.35  # struct distance between the ends of a gradual transition (as for a cut)
BLEND_MAX_RESIDUAL = 0.25  # unexplained fraction of the middle frame's block variance
BLEND_SHARE = (0.15, 0.85)  # the middle frame must hold a real share of both ends
BLEND_MAX_GAIN = 0.5  # both ends must explain at least half of what the better end alone leaves
COMPOSITE_MIN = 0.6  # a wipe frame: this fraction of the differing blocks match one end or the other


@dataclass(frozen=True)
class FrameFeatures:
    """Features of one analysed frame.

    Attributes
    ----------
    luma : np.ndarray
        (h, w) float32 thumbnail, zero mean, unit std (or divided by :data:`CONTRAST_FLOOR` when flatter).
    hist : np.ndarray
        (33,) float32 hue x saturation histogram of non-dark pixels (+ a grey bin), summing to 1 (or all zero
        for an all-dark frame).
    mean, contrast : float
        Mean and standard deviation of the grey thumbnail in grey levels (0-255).
    sharpness : float
        Mean absolute Laplacian of the grey thumbnail, in grey levels (a blur/detail measure).
    levels : np.ndarray
        (16,) float32 histogram of grey levels, summing to 1: with ``hist``, what a gradual transition
        changes and camera motion over one scene mostly does not (see :func:`hist_distance`).
    """

    luma: np.ndarray
    hist: np.ndarray
    mean: float
    contrast: float
    sharpness: float
    levels: np.ndarray = field(default_factory=lambda: np.zeros(LEVEL_BINS, np.float32), repr=False)

    @property
    def scale(self) -> float:
        """The divisor that normalised ``luma`` (grey levels)."""
        return max(self.contrast, CONTRAST_FLOOR)

    @property
    def flat(self) -> bool:
        """True when the frame has (almost) no contrast: black, white or uniform."""
        return self.contrast < CONTRAST_FLOOR


@dataclass(frozen=True)
class PairScores:
    """Cues between two analysed frames ``a`` -> ``b``.

    Attributes
    ----------
    hist : float
        Half L1 histogram distance in [0, 1].
    struct : float
        Motion-compensated median-block structural distance (about 1.1 for unrelated images).
    dx, dy : float
        Translation of ``b`` relative to ``a`` in thumbnail widths (phase correlation).
    response : float
        Phase-correlation peak strength in [0, 1] (how much one translation explains the pair).
    """

    hist: float
    struct: float
    dx: float
    dy: float
    response: float


@dataclass(frozen=True)
class Boundary:
    """A detected shot boundary: the first frame of the new shot (0-based), or a frame inside a transition."""

    frame: int
    kind: str  # "cut" | "gradual"
    score: float


def thumbnail(frame: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    """Downscale a (H, W, 3) or (H, W) uint8 frame to ``width`` pixels wide (aspect kept).

    Area averaging over every source pixel divides sensor noise by the decimation factor: a noisy, low-contrast
    shot keeps a clean thumbnail. The frame is first halved (2x2 area averages, OpenCV's vectorised path) while
    the result stays at least four times the target width, then area-resized the rest of the way: the same
    average over all pixels as one large area resize up to uint8 rounding, at about half its cost (640x360:
    ~0.14 ms instead of ~0.26 ms; 1080p: ~0.9 ms instead of ~2.7 ms), because one large non-2x area resize
    takes OpenCV's generic, unvectorised path. Pure OpenCV (it releases the GIL).
    """
    h, w = frame.shape[:2]
    tw = min(width, w)
    th = max(4, round(h * tw / w))
    small = frame
    while w >= 8 * tw and h >= 16:
        small = small[:h - h % 2, :w - w % 2]  # even crop (a view): an exact 2x reduction
        h, w = h // 2, w // 2
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (tw, th), interpolation=cv2.INTER_AREA)


def frame_features(frame: np.ndarray | None, width: int = THUMB_WIDTH,
                   thumb: np.ndarray | None = None) -> FrameFeatures:
    """Features of one frame: (H, W, 3) uint8 BGR (OpenCV order) or (H, W) grey.

    ``thumb``: the frame's :func:`thumbnail`, when already computed (e.g. by a reader thread); ``frame`` is
    then not looked at.
    """
    if thumb is None:
        if frame is None:
            raise ValueError("frame_features needs a frame or its thumbnail")
        thumb = thumbnail(frame, width)
    if thumb.ndim == 2:
        gray = thumb
        thumb = cv2.cvtColor(thumb, cv2.COLOR_GRAY2BGR)
    else:
        gray = cv2.cvtColor(thumb, cv2.COLOR_BGR2GRAY)
    g = gray.astype(np.float32)
    m, s = cv2.meanStdDev(g)
    mean, sd = float(m[0, 0]), float(s[0, 0])
    luma = (g - mean) * (1.0 / max(sd, CONTRAST_FLOOR))
    # colour histogram: hue x saturation of pixels with colour (S and V >= _CHROMA_MIN), one bin for grey lit
    # pixels (V >= _CHROMA_MIN, S below), dark pixels left out; calcHist and masks: a few C calls per frame
    hsv = cv2.cvtColor(thumb, cv2.COLOR_BGR2HSV)
    lit = cv2.inRange(hsv, (0, 0, _CHROMA_MIN), (255, 255, 255))
    colour = cv2.inRange(hsv, (0, _CHROMA_MIN, _CHROMA_MIN), (255, 255, 255))
    hb, sb = HIST_BINS
    hist = np.empty(hb * sb + 1, np.float32)
    hist[:-1] = cv2.calcHist([hsv], [0, 1], colour, [hb, sb], [0, 180, 0, 256]).ravel()
    n_lit = cv2.countNonZero(lit)
    hist[-1] = n_lit - cv2.countNonZero(colour)
    if n_lit < HIST_MIN_SHARE * gray.size:
        hist[:] = 0.0  # mostly dark: a histogram of a few noisy pixels is no evidence (compared as such)
    hist *= 1.0 / max(float(n_lit), 1.0)
    sharp = float(np.abs(cv2.Laplacian(g, cv2.CV_32F)).mean())
    levels = cv2.calcHist([gray], [0], None, [LEVEL_BINS], [0, 256]).ravel()
    levels *= 1.0 / max(float(gray.size), 1.0)
    return FrameFeatures(luma=luma, hist=hist, mean=mean, contrast=sd, sharpness=sharp, levels=levels)


def hist_distance(a: FrameFeatures, b: FrameFeatures) -> float:
    """Half L1 distance of the colour histograms or of the grey-level histograms, whichever is larger, in
    [0, 1]: the share of pixels whose colour or grey level changed bin, wherever they moved to."""
    hd = 0.5 * float(np.abs(a.hist - b.hist).sum()) if a.hist.any() and b.hist.any() else 0.0
    return max(hd, 0.5 * float(np.abs(a.levels - b.levels).sum()))


_WINDOWS: dict[tuple[int, int], np.ndarray] = {}


def _window(shape: tuple[int, int]) -> np.ndarray:
    win = _WINDOWS.get(shape)
    if win is None:
        win = _WINDOWS[shape] = cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F)
    return win


def _median_block(diff: np.ndarray) -> float:
    return _median(_block_means(diff))


def _median(x: np.ndarray) -> float:
    """Median of a small array (a sorted list beats ``np.median``'s overhead below a few hundred values)."""
    v = sorted(x.ravel().tolist())
    n = len(v)
    return float(v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]))


def _grid(h: int, w: int) -> tuple[int, int, int, int]:
    """(rows, cols, y0, x0): the block grid for an (h, w) array and the offset of its centred whole-block crop."""
    gw = min(_GRID, w)
    gh = max(1, round(gw * h / w))
    bh, bw = max(1, h // gh), max(1, w // gw)
    return gh, gw, (h - gh * bh) // 2, (w - gw * bw) // 2


def _block_means(diff: np.ndarray) -> np.ndarray:
    """Mean of ``diff`` per block of a grid about :data:`_GRID` blocks wide (the few border pixels past whole
    blocks are left out: an integer area reduction, OpenCV's fast path)."""
    h, w = diff.shape
    gh, gw, y0, x0 = _grid(h, w)
    return cv2.resize(diff[y0:h - y0, x0:w - x0] if (y0 or x0) else diff, (gw, gh), interpolation=cv2.INTER_AREA)


def _local_match(a: np.ndarray, b: np.ndarray, r: int = 1) -> float:
    """Median over blocks of the best block difference over shifts of up to ``r`` pixels.

    Each block may move on its own by a pixel: that absorbs what one global translation cannot (zoom,
    parallax, an object moving) while a different image still differs at every shift. The (2r+1)^2 shifted
    copies of ``b`` are stacked into one tall array, so the whole test is four OpenCV/NumPy calls.
    """
    h, w = a.shape
    ch, cw = h - 2 * r, w - 2 * r
    gh, gw, y0, x0 = _grid(ch, cw)
    H, W = gh * (ch // gh), gw * (cw // gw)  # whole blocks only: an exact area reduction per shifted copy
    oy, ox = r + y0, r + x0
    n = (2 * r + 1) ** 2
    shifted = np.concatenate([b[oy + dy:oy + dy + H, ox + dx:ox + dx + W]
                              for dy in range(-r, r + 1) for dx in range(-r, r + 1)])
    d = cv2.absdiff(shifted, np.tile(a[oy:oy + H, ox:ox + W], (n, 1)))
    means = cv2.resize(d, (gw, gh * n), interpolation=cv2.INTER_AREA)
    return _median(means.reshape(n, gh, gw).min(axis=0))


def struct_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """Motion-compensated structural distance of two normalised luma thumbnails.

    Returns
    -------
    (distance, dx, dy, response)
        ``distance``: after undoing the global translation (phase correlation), the median over blocks of
        the mean absolute difference, each block allowed one more pixel of its own motion;
        ``dx, dy`` in pixels, ``b`` relative to ``a``; ``response``: phase-correlation peak strength.
    """
    win = _window(a.shape)
    # windowed copies: OpenCV 5's phaseCorrelate multiplies its inputs by the window in place
    (dx, dy), resp = cv2.phaseCorrelate(a * win, b * win)
    h, w = a.shape
    if abs(dx) < 0.3 and abs(dy) < 0.3 or abs(dx) > w / 3 or abs(dy) > h / 3:
        return _local_match(a, b), dx, dy, resp
    warp = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)  # sample b at x + d: aligns b onto a
    bw = cv2.warpAffine(b, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)
    mx, my = int(np.ceil(abs(dx))), int(np.ceil(abs(dy)))
    comp = _local_match(a[my:h - my, mx:w - mx], bw[my:h - my, mx:w - mx])
    if comp < 0.2:  # the translation explains the pair: the uncompensated match cannot be much lower
        return comp, dx, dy, resp
    return min(_local_match(a, b), comp), dx, dy, resp


def pair_scores(a: FrameFeatures, b: FrameFeatures) -> PairScores:
    """All cues between analysed frames ``a`` and ``b`` (see the module docstring)."""
    hd = 0.5 * float(np.abs(a.hist - b.hist).sum()) if a.hist.any() and b.hist.any() else 0.0
    sd, dx, dy, resp = struct_distance(a.luma, b.luma)
    w = a.luma.shape[1]
    return PairScores(hist=hd, struct=sd, dx=dx / w, dy=dy / w, response=float(resp))


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
    dab = _block_means(cv2.absdiff(a, b))
    dam = _block_means(cv2.absdiff(a, m))
    dbm = _block_means(cv2.absdiff(b, m))
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


def _span_due(h: int, b: int) -> bool:
    """Whether gradual triples of span ``h`` (samples) are tried with their end at sample ``b``."""
    return b % max(1, h // 2) == 0


def _small_median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


@dataclass
class _Sample:
    frame: int
    feat: FrameFeatures
    step: PairScores | None  # cues from the previous sample to this one
    jump: float | None = None  # computed once the motion after it is known
    hstep: float = 0.0  # hist_distance from the previous sample


@dataclass
class ShotDetector:
    """Streaming, adaptive shot-boundary detector over analysed frames (see the module docstring).

    Push ``(frame_index, FrameFeatures)`` for frames at increasing indices (every frame, or every n-th: the
    detector reports a cut between two analysed frames at the middle frame between them). Boundaries come out
    in frame order, with a delay of at most :attr:`max_delay` analysed frames; :meth:`flush` returns the rest
    at the end of the stream. Memory is bounded by the window sizes.

    Parameters
    ----------
    rate : float
        Analysed frames per second (fps / stride); windows below are in seconds and converted with it.
    z : float
        Robust z-score (median/MAD) a step must reach to be a cut.
    window_s : float
        Seconds of past steps used for the adaptive baseline.
    max_gradual_s : float
        Longest gradual transition looked for (seconds).
    flash_samples : int
        Longest brightness spike (in analysed frames) that is treated as a flash, not a cut.
    lookahead : int
        Analysed frames after a step that its decision waits for (flash check, motion after a jump).
    """

    rate: float
    z: float = 6.0
    window_s: float = 2.0
    max_gradual_s: float = 1.6
    flash_samples: int = 1
    lookahead: int = 8
    trace: list | None = None  # set to [] to record cues and gradual candidates (for debugging)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.z <= 0 or self.window_s <= 0 or self.max_gradual_s <= 0 or self.flash_samples < 0:
            raise ValueError("z, window_s and max_gradual_s must be > 0 and flash_samples >= 0")
        self.lookahead = max(self.lookahead, self.flash_samples + 1, 4)
        self._past = max(8, round(self.window_s * self.rate))
        hmax = max(1, round(self.max_gradual_s * self.rate / 2))
        spans, h = [], 1
        while h < hmax:
            spans.append(h)
            h *= 2
        spans.append(hmax)
        self._spans: list[int] = sorted(set(spans))
        self._H = hmax
        self._buf: deque[_Sample] = deque(maxlen=max(self._past, 6 * hmax) + self.lookahead + 8)
        self._n = 0  # samples pushed
        self._decided = 0  # samples whose cut decision is made
        self._cuts: list[int] = [0]  # sample indices where shots start (0: the first)
        self._grad_block = 0  # gradual triples must start at or after this sample (end of the last transition)
        self._group: list[tuple[float, float, int, int, int, float]] = []  # (|share-.5|, -d, m, a, b, score)
        self._ready: list[tuple[int, Boundary]] = []  # (sample, boundary) decided but not yet released
        self._struct_cache: dict[tuple[int, int], float] = {}

    @property
    def max_delay(self) -> int:
        """Most analysed frames by which a released boundary can lag the newest pushed frame."""
        return self.lookahead + 5 * self._H + 2

    @property
    def last_step(self) -> PairScores | None:
        """Cues between the two most recently pushed frames (None before the second)."""
        return self._buf[-1].step if self._buf else None

    # ------------------------------------------------------------------ streaming API
    def push(self, frame: int, feat: FrameFeatures) -> list[Boundary]:
        """Add one analysed frame; return the boundaries that became certain (in frame order)."""
        step = pair_scores(self._buf[-1].feat, feat) if self._buf else None
        hstep = hist_distance(self._buf[-1].feat, feat) if self._buf else 0.0
        self._buf.append(_Sample(frame, feat, step, hstep=hstep))
        self._n += 1
        while self._decided < self._n - self.lookahead:
            self._advance(self._decided)
            self._decided += 1
        return self._release(self._n - 1 - self.max_delay)

    def flush(self) -> list[Boundary]:
        """Decide the remaining samples (end of stream) and return their boundaries."""
        while self._decided < self._n:
            self._advance(self._decided)
            self._decided += 1
        for b in range(max(0, self._n - 2 * self._H), self._n):
            self._gradual(b)
        self._close_group()
        return self._release(None)

    # ------------------------------------------------------------------ internals
    def _advance(self, i: int) -> None:
        self._decide_cut(i)
        if i - 2 * self._H >= 0:
            self._gradual(i - 2 * self._H)

    def _release(self, upto: int | None) -> list[Boundary]:
        self._ready.sort(key=lambda sb: sb[1].frame)
        out = [b for s, b in self._ready if upto is None or s <= upto]
        self._ready = [(s, b) for s, b in self._ready if not (upto is None or s <= upto)]
        if len(self._cuts) > 64:
            self._cuts = self._cuts[-32:]
        return out

    def _get(self, i: int) -> _Sample | None:
        j = i - (self._n - len(self._buf))
        return self._buf[j] if 0 <= j < len(self._buf) else None

    def _shot_start(self, i: int) -> int:
        """Sample where the shot containing sample i starts (last cut at or before i)."""
        return max(c for c in self._cuts if c <= i) if any(c <= i for c in self._cuts) else 0

    def _cut_between(self, a: int, b: int) -> bool:
        """A decided cut at a sample in (a, b]."""
        return any(a < c <= b for c in self._cuts)

    def _shift(self, i: int) -> np.ndarray | None:
        s = self._get(i)
        return None if s is None or s.step is None else np.array([s.step.dx, s.step.dy])

    def _steady(self, k: int) -> bool:
        """Step k is within a shot: its translation explains it (small compensated distance)."""
        s = self._get(k)
        return s is not None and s.step is not None and s.step.struct < STEADY_MAX

    def _motion(self, rng: range) -> np.ndarray | None:
        """Median translation over the steady steps in ``rng`` (a few steps: plain Python is faster)."""
        xs, ys = [], []
        for k in rng:
            s = self._get(k)
            if s is not None and s.step is not None and s.step.struct < STEADY_MAX:
                xs.append(s.step.dx)
                ys.append(s.step.dy)
        if not xs:
            return None
        return np.array([_small_median(xs), _small_median(ys)])

    def _jump(self, i: int) -> float:
        """How much the translation at step i departs from the motion both before and after it."""
        si = self._shift(i)
        if si is None:
            return 0.0
        start = self._shot_start(i - 1)
        before = self._motion(range(max(start + 1, i - 3), i))
        after = self._motion(range(i + 1, i + 4))
        if before is None or after is None:  # motion unknown on one side: no evidence
            return 0.0
        return float(min(np.linalg.norm(si - before), np.linalg.norm(si - after)))

    def _jump_of(self, k: int) -> float | None:
        """The jump of step k, once the three steps after it are known (cached)."""
        s = self._get(k)
        if s is None or s.step is None:
            return None
        if s.jump is None and k + 3 < self._n:
            s.jump = self._jump(k) if s.step.response > 0.05 else 0.0
        return s.jump

    def _cues(self, i: int) -> dict[str, float]:
        s = self._get(i)
        assert s is not None and s.step is not None
        jump = self._jump_of(i)
        out = {"hist": s.step.hist, "struct": s.step.struct}
        prev = self._get(i - 1)
        if jump is not None and prev is not None and not (prev.feat.flat or s.feat.flat):  # noise has no shift
            out["jump"] = jump
        return out

    def _baseline(self, i: int) -> list[dict[str, tuple[float, float]]]:
        """Median and robust spread of each cue, separately over the steps before and after step i.

        Before: steps of the current shot only (up to ``window_s``); after: the next ``lookahead`` steps
        (the flash partner i+1 left out). A cut is a step that is unusual for the shot it ends *and* for the
        shot it starts; a shot that turns noisy or starts to zoom is unusual only for what came before.
        """
        lo = max(1, i - self._past, self._shot_start(i - 1) + 1)
        sides = []
        for ks in (range(lo, i), range(i + 2, i + self.lookahead + 1)):
            vals: dict[str, list[float]] = {"hist": [], "struct": [], "jump": []}
            for k in ks:
                s = self._get(k)
                if s is None or s.step is None:
                    continue
                for c, v in self._cues(k).items():
                    vals[c].append(v)
            if len(vals["struct"]) < 3:
                continue  # too few steps on this side to say what is usual there
            side = {}
            for c, vs in vals.items():
                if len(vs) < 3:
                    continue
                med = _small_median(vs)
                mad = _small_median([abs(v - med) for v in vs]) * 1.4826
                side[c] = (med, max(mad, SPREAD_FLOOR[c], 0.1 * med))
            sides.append(side)
        return sides

    def _fires(self, cues: dict[str, float], base: list[dict[str, tuple[float, float]]],
               recent: dict[str, float] | None = None, level: bool = False) -> float:
        """The largest z (the smaller of before/after) among cues that pass the floor and the z-test, or 0.

        ``recent``: the largest value of each cue over the last steps of the shot; a cut must clearly exceed
        them (a shot that turned noisy or fast a moment ago, before the baseline caught up, is not a cut).
        A busy shot (fast pan, heavy noise) next to the step makes its side's z small; the step still fires
        when the other side's z passes and either ``level`` (exposure steady on both sides, different across:
        :meth:`_level_step`) or the step is several times what is usual on the busy side.
        """
        best = 0.0
        for c, v in cues.items():
            if v < CUT_MIN[c]:
                continue
            if len(base) < 2 and v < 2 * CUT_MIN[c] and not level:
                continue  # one side unknown (a short shot, the stream's start or end): ask for more
            if recent is not None and c in recent and v < RECENT_RATIO * recent[c] and not level:
                continue
            sides = [side[c] for side in base if c in side]
            zs = [(v - med) / spread for med, spread in sides] or [v / SPREAD_FLOOR[c]]
            zc = min(zs)
            if zc < self.z and max(zs) >= self.z and (
                    level or (v >= 2 * CUT_MIN[c] and all(v >= 3 * med for med, _ in sides) and zc >= self.z / 2)):
                zc = max(zs)
            if zc >= self.z:
                best = max(best, zc)
        return best

    def _similar(self, cues: dict[str, float], base: list[dict[str, tuple[float, float]]]) -> bool:
        """Two frames differ no more than neighbouring frames of the shot usually do (every z <= z/2)."""
        for c, v in cues.items():
            if v < CUT_MIN[c] / 2:
                continue
            zs = [(v - side[c][0]) / side[c][1] for side in base if c in side]
            if not zs or min(zs) > self.z / 2:
                return False
        return True

    def _is_flash(self, i: int, base: list[dict[str, tuple[float, float]]]) -> bool:
        """The change at step i is undone within ``flash_samples`` (a spike), before or after it."""
        start = self._shot_start(i - 1)
        motion = self._motion(range(max(start + 1, i - 4), i))
        for m in range(1, self.flash_samples + 1):
            for pre, post in ((i - 1, i + m), (i - 1 - m, i)):
                fa, fb = self._get(pre), self._get(post)
                if pre < start or fa is None or fb is None:
                    continue
                p = pair_scores(fa.feat, fb.feat)
                expect = (post - pre) * motion if motion is not None else np.zeros(2)
                jump = float(np.linalg.norm(np.array([p.dx, p.dy]) - expect))
                if self._similar({"hist": p.hist, "struct": p.struct, "jump": jump}, base):
                    return True
        return False

    def _blend(self, a: int, m: int, b: int) -> tuple[float, float, float] | None:
        """(residual, share, gain) when ``m`` is a transition frame between ``a`` and ``b``, else None.

        A transition frame is a linear blend of the ends (dissolve), a patchwork of them (wipe), or a frame
        without contrast between two frames that have it (fade through black or white).
        """
        fa, fm, fb = self._get(a), self._get(m), self._get(b)
        if fa is None or fm is None or fb is None or fa.feat.flat or fb.feat.flat:
            return None
        ratio = fm.feat.contrast / min(fa.feat.contrast, fb.feat.contrast)
        if fm.feat.flat or ratio < DIP_RATIO:  # a fade: the darkest frame in the middle ranks first
            return 0.0, 0.5 + 0.5 * min(ratio, 1.0), 0.0
        fit = blend_fit(fa.feat.luma, fm.feat.luma, fb.feat.luma, scale_a=fa.feat.scale, scale_b=fb.feat.scale)
        if is_blend(fit):
            return fit
        comp = composite_fit(*(_grey(f.feat) for f in (fa, fm, fb)),
                             min_diff=max(3.0, 0.5 * min(fa.feat.contrast, fb.feat.contrast)))
        if is_composite(comp):
            return 1.0 - comp[0], comp[1], 0.0
        return None

    def _in_gradual(self, i: int) -> bool:
        """A step into or out of a blend or a contrast-less frame belongs to a gradual transition, not a cut."""
        prev, cur = self._get(i - 1), self._get(i)
        if prev is None or cur is None:
            return True
        if self._level_step(i):
            return False  # a fade changes contrast over several frames, a cut (to a dark shot too) at once
        # Next to a frame without contrast (the bottom of a fade), structure emerges from quantisation and
        # noise step by step: those steps belong to the fade, which the gradual test reports once. Only steps
        # between two dim frames, though: a step to or from a lit frame next to a fade or a flash is a cut.
        around = [x.feat for x in map(self._get, range(i - 4, i + 4)) if x is not None]
        peak = max(f.contrast for f in around)
        if max(prev.feat.contrast, cur.feat.contrast) < DIP_RATIO * peak and any(f.flat for f in around):
            return True
        # A step at the bottom of a contrast valley (much more contrast a few frames before and after): a fade
        # through black that the sampling caught without a black frame. Both frames of the step are dim: in a
        # fade the content changes where there is least contrast.
        high = max(prev.feat.contrast, cur.feat.contrast)
        before = [x.feat.contrast for x in map(self._get, range(i - 5, i - 1)) if x is not None]
        after = [x.feat.contrast for x in map(self._get, range(i + 1, i + 5)) if x is not None]
        if before and after and high < DIP_RATIO * min(max(before), max(after)):
            return True
        start = self._shot_start(i - 1)
        triples = [(i - 1, i, i + k) for k in range(1, 3)]
        triples += [(i - 1 - k, i - 1, i) for k in range(1, 3) if i - 1 - k >= start]
        for a, m, b in triples:
            if self._blend(a, m, b) is not None:
                return True
        return False

    def _level_step(self, i: int) -> bool:
        """Contrast and brightness are steady over the two samples before step i and the two from i on, but
        differ across it: one step from one exposure to another, which a fade (gradual by definition) is not."""
        xs = [self._get(k) for k in (i - 2, i - 1, i, i + 1)]
        if any(x is None for x in xs) or self._cut_between(i - 2, i - 1) or self._cut_between(i, i + 1):
            return False
        c = [x.feat.contrast for x in xs]  # type: ignore[union-attr]
        m = [x.feat.mean for x in xs]  # type: ignore[union-attr]

        def same(p: float, q: float, tol: float) -> bool:
            return abs(p - q) <= tol * max(p, q) + 1.0

        steady = same(c[0], c[1], 0.15) and same(c[2], c[3], 0.15) and same(m[0], m[1], 0.1) and same(m[2], m[3], 0.1)
        return steady and not (same(c[1], c[2], 0.3) and same(m[1], m[2], 0.2))

    def _decide_cut(self, i: int) -> None:
        s = self._get(i)
        if s is None or s.step is None or i < 1:
            return
        cues = self._cues(i)
        if all(v < CUT_MIN[c] for c, v in cues.items()) and self.trace is None:
            return  # below every floor: cannot be a cut, skip the baseline (most steps end here)
        base = self._baseline(i)
        recent: dict[str, float] = {}
        for k in range(max(self._shot_start(i - 1) + 1, i - 2), i):
            sk = self._get(k)
            if sk is not None and sk.step is not None:
                for c, v in self._cues(k).items():
                    recent[c] = max(recent.get(c, 0.0), v)
        z = self._fires(cues, base, recent, level=self._level_step(i))
        if self.trace is not None:
            self.trace.append((s.frame, {c: round(v, 3) for c, v in self._cues(i).items()},
                               [{c: (round(m, 3), round(sp, 3)) for c, (m, sp) in side.items()} for side in base], z))
        if z > 0 and not self._is_flash(i, base) and not self._in_gradual(i):
            prev = self._get(i - 1)
            assert prev is not None
            frame = prev.frame + (s.frame - prev.frame + 1) // 2
            self._cuts.append(i)
            self._ready.append((i, Boundary(frame=frame, kind="cut", score=round(float(z), 3))))

    def _travel(self, a: int, b: int) -> float:
        """Distance the view moved between samples a and b (sum of step translations, in frame widths)."""
        x = y = 0.0
        for k in range(a + 1, b + 1):
            s = self._get(k)
            if s is not None and s.step is not None and s.step.response > 0.2 and s.step.struct < STEADY_MAX:
                x += s.step.dx  # only translations that explain their step (not a transition's noise)
                y += s.step.dy
        return float(np.hypot(x, y))

    def _struct(self, a: int, b: int) -> float | None:
        """Structural distance of samples a and b (cached: the gradual test asks for most pairs three times)."""
        d = self._struct_cache.get((a, b))
        if d is not None:
            return d
        fa, fb = self._get(a), self._get(b)
        if fa is None or fb is None:
            return None
        d = self._struct_cache[(a, b)] = struct_distance(fa.feat.luma, fb.feat.luma)[0]
        if len(self._struct_cache) > 4 * self._buf.maxlen:  # type: ignore[operator]
            oldest = self._n - len(self._buf)
            self._struct_cache = {k: v for k, v in self._struct_cache.items() if k[0] >= oldest}
        return d

    def _gradual(self, b: int) -> None:
        """Look for transitions whose triple ends at sample b (frames up to b + 2*H are known).

        A triple of span h is tried at every (h/2)-th end sample only (:func:`_span_due`): a transition that
        needs span h lasts about 2h samples, so it still gets several triples, while the wide spans, a
        motion-compensated distance each in every moving shot, cost a half or a quarter as much.
        """
        fb = self._get(b)
        if fb is None:
            return
        spans = [h for h in self._spans if _span_due(h, b) and b - 2 * h >= self._grad_block
                 and not self._cut_between(b - 2 * h, b)]
        if spans:
            fa = self._get(b - 2 * spans[-1])
            # cheap pre-filter: the ends of the widest span barely differ (no compensation needed to say so)
            if fa is None or _median_block(cv2.absdiff(fa.feat.luma, fb.feat.luma)) < GRADUAL_MIN:
                spans = []
            elif (self._struct(b - 2 * spans[-1], b) or 0.0) < GRADUAL_MIN:
                spans = []  # only motion between the widest ends (a pan): no shot change inside
        for h in spans:
            a, m = b - 2 * h, b - h
            if self._travel(a, b) > 0.25:
                break  # the camera moved too far to tell a transition from motion (wider spans: further)
            d = self._struct(a, b)  # (cached, so asked before the blend fit)
            if d is None or d < GRADUAL_MIN:
                continue
            fit = self._blend(a, m, b)
            if fit is None:
                continue
            residual, share, _ = fit
            # The change must be confined to [a, b]: the same span before a and after b changes much less.
            # A zoom or a steady camera move changes every window alike; a transition joins calmer shots.
            outside = [self._struct(x, y) for x, y in ((a - 2 * h, a), (b, b + 2 * h))
                       if not self._cut_between(x, y) and x >= 0 and y < self._n]
            known = [o for o in outside if o is not None]
            out_d = max(known, default=0.0)
            calm = min(known, default=0.0)
            if self.trace is not None:
                self.trace.append(("g", self._get(a).frame, self._get(m).frame, fb.frame,  # type: ignore[union-attr]
                                   round(d, 3), round(residual, 3), round(share, 3), round(out_d, 3)))
            if d < 2.0 * calm or d < 1.25 * out_d:
                continue  # at least one side much calmer (a shaky shot may end in a still one), none as busy
            if not known and d < 2 * GRADUAL_MIN:
                continue  # nothing around to compare with (cuts or the stream's ends): ask for more change
            if self._group and (m > max(g[4] for g in self._group) + 2
                                or self._cut_between(max(g[2] for g in self._group), m)):
                self._close_group()  # past every triple of the open transition (or across a cut): a new one
            self._group.append((abs(share - 0.5), -d, m, a, b, d * (1 - residual)))
        self._hist_gradual(b)
        if self._group and b - max(g[4] for g in self._group) > self._H:
            self._close_group()

    def _hist_gradual(self, b: int) -> None:
        """Transitions seen in the histograms: motion-blind, so a dissolve into or out of a moving shot counts.

        Over ``[a, b]`` (2h samples) the colour or grey-level histogram changes like two shots do, spread over
        several steps (no step carries half of it: not a cut), through a middle frame that lies between the ends
        (both halves carry a real part and add up to about the whole), while the same span before ``a`` and
        after ``b`` changes much less (camera motion over one scene that drifts the histogram keeps drifting).
        The structure differs too (:data:`GRADUAL_MIN`), so a slow change of light is no transition.
        """
        for h in self._spans:
            a, m = b - 2 * h, b - h
            if h < 2 or not _span_due(h, b) or a < self._grad_block or self._cut_between(a, b):
                continue
            xs = [self._get(k) for k in range(a, b + 1)]
            if any(x is None for x in xs):
                continue
            f = [x.feat for x in xs]  # type: ignore[union-attr]
            dab = hist_distance(f[0], f[-1])
            if dab < HIST_GRADUAL_MIN:
                continue
            if max(x.hstep for x in xs[1:]) > 0.5 * dab:  # type: ignore[union-attr]
                continue
            dam, dmb = hist_distance(f[0], f[h]), hist_distance(f[h], f[-1])
            if min(dam, dmb) < 0.2 * dab or dam + dmb > 1.25 * dab:
                continue
            # Steady motion drifts the histogram at a steady pace: the steps inside must be clearly faster than
            # the steps of the same span on a side without a cut (at least one side must be known).
            inside = dab / (2 * h)
            outside = []
            for x, y in ((a - 2 * h, a), (b, b + 2 * h)):
                if x < 0 or y >= self._n or self._cut_between(x, y):
                    continue
                fs = [self._get(k) for k in range(x + 1, y + 1)]
                if any(q is None for q in fs):
                    continue
                outside.append(sum(q.hstep for q in fs) / len(fs))  # type: ignore[union-attr]
            if not outside or inside < 2.0 * max(outside) + 0.01:
                continue
            d = self._struct(a, b)
            if d is None or d < GRADUAL_MIN:
                continue
            share = dam / (dam + dmb)
            if self.trace is not None:
                self.trace.append(("h", self._get(a).frame, self._get(m).frame, self._get(b).frame,  # type: ignore[union-attr]
                                   round(dab, 3), round(share, 3), round(inside, 3), [round(o, 3) for o in outside]))
            if self._group and (m > max(g[4] for g in self._group) + 2
                                or self._cut_between(max(g[2] for g in self._group), m)):
                self._close_group()
            self._group.append((abs(share - 0.5), -d, m, a, b, dab))

    def _part_of(self, c: int, hi: int) -> bool:
        """The cut at sample c carries at most half of the structural change from c - 1 to ``hi``: it was the
        first step of the gradual transition that ends at ``hi``, not a cut before it."""
        step, whole = self._struct(c - 1, c), self._struct(c - 1, hi)
        return step is not None and whole is not None and step <= 0.5 * whole

    def _close_group(self) -> None:
        group, self._group = self._group, []
        if not group:
            return
        best = min(group)
        lo, hi = min(g[3] for g in group), max(g[4] for g in group)
        self._grad_block = max(self._grad_block, hi)
        # a cut inside (or right next to) the same transition was already reported: a cut up to two samples
        # before the first triple that carries at most half of the change was the transition's first step
        if any(lo < c <= hi or abs(c - best[2]) <= 2 or (lo - 2 <= c <= lo and self._part_of(c, hi))
               for c in self._cuts):
            return
        m = self._get(best[2])
        if m is not None:
            self._ready.append((best[2], Boundary(frame=m.frame, kind="gradual", score=round(float(best[5]), 3))))


def detect_boundaries(frames: list[tuple[int, np.ndarray]], rate: float, **kwargs: float) -> list[Boundary]:
    """Offline helper: run :class:`ShotDetector` over ``(frame_index, BGR frame)`` pairs."""
    det = ShotDetector(rate=rate, **kwargs)  # type: ignore[arg-type]
    out: list[Boundary] = []
    for idx, fr in frames:
        out += det.push(idx, frame_features(fr))
    out += det.flush()
    return sorted(out, key=lambda b: b.frame)
