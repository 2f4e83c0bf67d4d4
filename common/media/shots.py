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
* ``hist``: a coarse HSV colour histogram (8x4x4 bins): blind to motion, sees colour/brightness changes.

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
are again similar (or, symmetrically, when the spike ends there): a brightness spike returns, a cut stays.

Gradual transitions (dissolves, fades through black, wipes) change little per step, so no single step is an
outlier. They are found with triples of analysed frames ``(a, m, b)`` at several spans: when ``a`` and ``b``
differ like two shots do and the middle frame ``m`` is, block by block, a linear blend of ``a`` and ``b``
(least squares with a small residual, and a real share of both), ``m`` lies inside a transition. A pan or a
zoom also makes ``a`` and ``b`` differ, but its middle frame is a displaced image, not a blend, so the fit
fails. A fade through black passes through frames without contrast between two different shots. Among the
accepted triples of one transition, the one whose blend is closest to half-and-half gives the boundary.
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
    "detect_boundaries",
    "frame_features",
    "pair_scores",
    "struct_distance",
    "thumbnail",
]

THUMB_WIDTH = 64
CONTRAST_FLOOR = 4.0  # grey levels; below this a frame has no visible structure (black, fade, lens cap)
HIST_BINS = (8, 4, 4)  # H, S, V: coarse, so sensor noise rarely moves a pixel across a bin
_GRID = 8  # blocks across the thumbnail for the median block difference

# What a shot change means physically (see the module docstring); the adaptive z-test does the real work.
CUT_MIN = {"hist": 0.30, "struct": 0.35, "jump": 0.04}
# Spread floors for the z-test: the smallest MAD we trust (a static synthetic shot has MAD ~ 0).
SPREAD_FLOOR = {"hist": 0.02, "struct": 0.03, "jump": 0.006}
GRADUAL_MIN = 0.35  # struct distance between the ends of a gradual transition (as for a cut)
BLEND_MAX_RESIDUAL = 0.25  # unexplained fraction of the middle frame's block variance
BLEND_SHARE = (0.15, 0.85)  # the middle frame must hold a real share of both ends


@dataclass(frozen=True)
class FrameFeatures:
    """Features of one analysed frame.

    Attributes
    ----------
    luma : np.ndarray
        (h, w) float32 thumbnail, zero mean, unit std (or divided by :data:`CONTRAST_FLOOR` when flatter).
    hist : np.ndarray
        (128,) float32 HSV histogram summing to 1.
    mean, contrast : float
        Mean and standard deviation of the grey thumbnail in grey levels (0-255).
    sharpness : float
        Mean absolute Laplacian of the grey thumbnail, in grey levels (a blur/detail measure).
    """

    luma: np.ndarray
    hist: np.ndarray
    mean: float
    contrast: float
    sharpness: float

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

    Rows and columns are first decimated to about twice the target (a strided view: no work on the pixels
    that are skipped), then area-averaged, which averages sensor noise away at little cost.
    """
    h, w = frame.shape[:2]
    tw = min(width, w)
    th = max(4, int(round(h * tw / w)))
    step = max(1, w // (2 * tw))
    small = frame[::step, ::step] if step > 1 else frame
    return cv2.resize(small, (tw, th), interpolation=cv2.INTER_AREA)


def frame_features(frame: np.ndarray, width: int = THUMB_WIDTH) -> FrameFeatures:
    """Features of one frame: (H, W, 3) uint8 BGR (OpenCV order) or (H, W) grey."""
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
    hsv = cv2.cvtColor(thumb, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(HIST_BINS), [0, 180, 0, 256, 0, 256]).ravel()
    hist *= 1.0 / max(float(hist.sum()), 1.0)
    sharp = float(np.abs(cv2.Laplacian(g, cv2.CV_32F)).mean())
    return FrameFeatures(luma=luma, hist=hist, mean=mean, contrast=sd, sharpness=sharp)


_WINDOWS: dict[tuple[int, int], np.ndarray] = {}


def _window(shape: tuple[int, int]) -> np.ndarray:
    win = _WINDOWS.get(shape)
    if win is None:
        win = _WINDOWS[shape] = cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F)
    return win


def _median_block(diff: np.ndarray) -> float:
    h, w = diff.shape
    gw = min(_GRID, w)
    gh = max(1, int(round(gw * h / w)))
    return float(np.median(cv2.resize(diff, (gw, gh), interpolation=cv2.INTER_AREA)))


def struct_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """Motion-compensated structural distance of two normalised luma thumbnails.

    Returns
    -------
    (distance, dx, dy, response)
        ``distance`` is the median over blocks of the mean absolute difference after undoing the global
        translation (the smaller of compensated and raw); ``dx, dy`` in pixels, ``b`` relative to ``a``.
    """
    raw = _median_block(cv2.absdiff(a, b))
    (dx, dy), resp = cv2.phaseCorrelate(a, b, _window(a.shape))
    h, w = a.shape
    if abs(dx) < 0.3 and abs(dy) < 0.3 or abs(dx) > w / 3 or abs(dy) > h / 3:
        return raw, dx, dy, resp
    warp = np.float32([[1, 0, dx], [0, 1, dy]])  # sample b at x + d: aligns b onto a
    bw = cv2.warpAffine(b, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)
    mx, my = int(np.ceil(abs(dx))) + 1, int(np.ceil(abs(dy))) + 1
    comp = _median_block(cv2.absdiff(a[my:h - my, mx:w - mx], bw[my:h - my, mx:w - mx]))
    return min(raw, comp), dx, dy, resp


def pair_scores(a: FrameFeatures, b: FrameFeatures) -> PairScores:
    """All cues between analysed frames ``a`` and ``b`` (see the module docstring)."""
    hd = 0.5 * float(np.abs(a.hist - b.hist).sum())
    sd, dx, dy, resp = struct_distance(a.luma, b.luma)
    w = a.luma.shape[1]
    return PairScores(hist=hd, struct=sd, dx=dx / w, dy=dy / w, response=float(resp))


def blend_fit(a: np.ndarray, m: np.ndarray, b: np.ndarray, block: int = 4) -> tuple[float, float]:
    """How well ``m`` is, block by block, a linear blend ``alpha*a + beta*b + gamma`` of ``a`` and ``b``.

    Only blocks where ``a`` and ``b`` differ are informative (elsewhere any share fits).

    Returns
    -------
    (residual, share)
        ``residual``: unexplained fraction of ``m``'s block variance (0 = a perfect blend, 1 = no fit);
        ``share``: the part of ``m``'s explained variance that comes from ``b`` (0 = all ``a``, 1 = all ``b``).
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
        return 1.0, 0.5
    det = saa * sbb - sab * sab
    ok = informative & (det > 1e-6 * (saa * sbb + 1e-12))
    if ok.sum() < 3:
        return 1.0, 0.5
    alpha = (sam * sbb - sbm * sab)[ok] / det[ok]
    beta = (sbm * saa - sam * sab)[ok] / det[ok]
    explained = alpha * sam[ok] + beta * sbm[ok]
    total = float(smm[ok].sum())
    if total <= 1e-9:
        return 1.0, 0.5
    residual = float(max(0.0, total - explained.sum()) / total)
    ea = alpha * alpha * saa[ok]
    eb = beta * beta * sbb[ok]
    share = float(eb.sum() / max(float((ea + eb).sum()), 1e-12))
    return residual, share


@dataclass
class _Sample:
    frame: int
    feat: FrameFeatures
    step: PairScores | None  # cues from the previous sample to this one
    jump: float = 0.0


@dataclass
class ShotDetector:
    """Streaming, adaptive shot-boundary detector over analysed frames (see the module docstring).

    Push ``(frame_index, FrameFeatures)`` for frames at increasing indices (every frame, or every n-th: the
    detector reports a cut between two analysed frames at the middle frame between them). Boundaries come out
    with a delay of a few samples (``lookahead`` for cuts, up to ``2 * max_span`` for gradual transitions);
    :meth:`flush` returns the rest at the end of the stream. Memory is bounded by the window sizes.

    Parameters
    ----------
    rate : float
        Analysed frames per second (fps / stride); windows below are in seconds and converted with it.
    z : float
        Robust z-score (median/MAD) a step must reach to be a cut candidate.
    window_s : float
        Seconds of past steps used for the adaptive baseline.
    max_gradual_s : float
        Longest gradual transition looked for (seconds).
    flash_samples : int
        Longest brightness spike (in analysed frames) that is treated as a flash, not a cut.
    """

    rate: float
    z: float = 6.0
    window_s: float = 2.0
    max_gradual_s: float = 2.0
    flash_samples: int = 1
    lookahead: int = 3
    _buf: deque = field(default_factory=deque, repr=False)
    _n: int = 0  # samples pushed
    _decided: int = 0  # samples whose cut decision is made
    _last_boundary: int = 0  # sample index at which the current shot starts
    _group: list = field(default_factory=list, repr=False)  # accepted gradual candidates of one transition
    _hist_len: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        self.lookahead = max(self.lookahead, self.flash_samples + 1, 3)
        self._past = max(8, int(round(self.window_s * self.rate)))
        hmax = max(1, int(round(self.max_gradual_s * self.rate / 2)))
        spans, h = [], 1
        while h < hmax:
            spans.append(h)
            h *= 2
        spans.append(hmax)
        self._spans = sorted(set(spans))
        self._hist_len = max(self._past, 2 * hmax) + self.lookahead + 4
        self._buf = deque(maxlen=self._hist_len)

    @property
    def max_delay(self) -> int:
        """Most analysed frames by which a reported boundary can lag the newest pushed frame."""
        return self.lookahead + 3 * max(self._spans) + 2

    @property
    def last_step(self) -> PairScores | None:
        """Cues between the two most recently pushed frames (None before the second)."""
        return self._buf[-1].step if self._buf else None

    # ------------------------------------------------------------------ streaming API
    def push(self, frame: int, feat: FrameFeatures) -> list[Boundary]:
        """Add one analysed frame; return boundaries that became certain."""
        step = pair_scores(self._buf[-1].feat, feat) if self._buf else None
        self._buf.append(_Sample(frame, feat, step))
        self._n += 1
        out: list[Boundary] = []
        while self._decided < self._n - self.lookahead:
            out += self._decide(self._decided)
            self._decided += 1
        return out

    def flush(self) -> list[Boundary]:
        """Decide the remaining samples (end of stream) and return their boundaries."""
        out: list[Boundary] = []
        while self._decided < self._n:
            out += self._decide(self._decided)
            self._decided += 1
        out += self._close_group()
        return out

    # ------------------------------------------------------------------ internals
    def _get(self, i: int) -> _Sample | None:
        j = i - (self._n - len(self._buf))
        return self._buf[j] if 0 <= j < len(self._buf) else None

    def _shift(self, i: int) -> np.ndarray | None:
        s = self._get(i)
        return None if s is None or s.step is None else np.array([s.step.dx, s.step.dy])

    def _jump(self, i: int) -> float:
        """How much the translation at step i departs from the motion before and after it."""
        si = self._shift(i)
        if si is None:
            return 0.0
        devs = []
        for rng in (range(i - 3, i), range(i + 1, i + 4)):
            ss = [v for k in rng if k > self._last_boundary and (v := self._shift(k)) is not None]
            if ss:
                devs.append(float(np.linalg.norm(si - np.median(np.stack(ss), axis=0))))
        return min(devs) if devs else 0.0

    def _cues(self, i: int) -> dict[str, float]:
        s = self._get(i)
        assert s is not None and s.step is not None
        return {"hist": s.step.hist, "struct": s.step.struct, "jump": s.jump}

    def _baseline(self, i: int) -> dict[str, tuple[float, float]]:
        lo = max(1, i - self._past)
        idx = [k for k in range(lo, i + self.lookahead + 1) if abs(k - i) > 1 or k == i - 1]
        vals: dict[str, list[float]] = {"hist": [], "struct": [], "jump": []}
        for k in idx:
            s = self._get(k)
            if s is None or s.step is None or k == i:
                continue
            for c, v in self._cues(k).items():
                vals[c].append(v)
        out = {}
        for c, v in vals.items():
            if len(v) < 2:
                out[c] = (0.0, SPREAD_FLOOR[c])
                continue
            arr = np.asarray(v)
            med = float(np.median(arr))
            mad = float(np.median(np.abs(arr - med))) * 1.4826
            out[c] = (med, max(mad, SPREAD_FLOOR[c], 0.1 * med))
        return out

    def _fires(self, cues: dict[str, float], base: dict[str, tuple[float, float]]) -> tuple[bool, float]:
        best = 0.0
        for c, v in cues.items():
            med, spread = base[c]
            zc = (v - med) / spread
            if v >= CUT_MIN[c] and zc >= self.z:
                best = max(best, zc)
        return best > 0, best

    def _pair_cues(self, i: int, j: int) -> dict[str, float] | None:
        a, b = self._get(i), self._get(j)
        if a is None or b is None:
            return None
        p = pair_scores(a.feat, b.feat)
        return {"hist": p.hist, "struct": p.struct, "jump": 0.0}

    def _is_flash(self, i: int, base: dict[str, tuple[float, float]]) -> bool:
        for m in range(1, self.flash_samples + 1):
            for pre, post in ((i - 1, i + m), (i - 1 - m, i)):
                if pre < self._last_boundary:
                    continue
                c = self._pair_cues(pre, post)
                if c is not None and not self._fires(c, base)[0]:
                    return True
        return False

    def _decide(self, i: int) -> list[Boundary]:
        out: list[Boundary] = []
        s = self._get(i)
        if s is None:
            return out
        # jumps need shifts up to i+3: available because decisions lag by `lookahead`
        if s.step is not None:
            s.jump = self._jump(i) if s.step.response > 0.05 else 0.0
        if i >= 1 and i > self._last_boundary and s.step is not None:
            base = self._baseline(i)
            fire, zmax = self._fires(self._cues(i), base)
            if fire and not self._is_flash(i, base):
                out += self._close_group(before=i)
                prev = self._get(i - 1)
                assert prev is not None
                frame = prev.frame + (s.frame - prev.frame + 1) // 2
                out.append(Boundary(frame=frame, kind="cut", score=float(zmax)))
                self._last_boundary = i
                return out
        out += self._gradual(i)
        return out

    def _gradual(self, b: int) -> list[Boundary]:
        out: list[Boundary] = []
        sb = self._get(b)
        if sb is None:
            return out
        hmax = max((h for h in self._spans if b - 2 * h >= self._last_boundary), default=0)
        if hmax == 0:
            return out
        sa = self._get(b - 2 * hmax)
        if sa is None or _median_block(cv2.absdiff(sa.feat.luma, sb.feat.luma)) < GRADUAL_MIN:
            pass  # cheap pre-filter: the ends of the widest span barely differ
        else:
            for h in self._spans:
                a = b - 2 * h
                if a < self._last_boundary:
                    break
                fa, fm, fb = self._get(a), self._get(b - h), self._get(b)
                if fa is None or fm is None or fb is None or fa.feat.flat or fb.feat.flat:
                    continue
                d, _, _, _ = struct_distance(fa.feat.luma, fb.feat.luma)
                if d < GRADUAL_MIN:
                    continue
                if fm.feat.flat:  # a fade through black (or white) between two different shots
                    residual, share = 0.0, 0.5
                else:
                    residual, share = blend_fit(fa.feat.luma, fm.feat.luma, fb.feat.luma)
                if residual <= BLEND_MAX_RESIDUAL and BLEND_SHARE[0] <= share <= BLEND_SHARE[1]:
                    self._group.append((abs(share - 0.5), -d, b - h, b, d * (1 - residual)))
        if self._group and b - max(g[3] for g in self._group) > max(self._spans):
            out += self._close_group()
        return out

    def _close_group(self, before: int | None = None) -> list[Boundary]:
        group = [g for g in self._group if before is None or g[3] < before]
        self._group = []
        if not group:
            return []
        best = min(group)
        m = self._get(best[2])
        self._last_boundary = max(self._last_boundary, max(g[3] for g in group))
        if m is None:  # pragma: no cover - the buffer always holds the group's span
            return []
        return [Boundary(frame=m.frame, kind="gradual", score=float(best[4]))]


def detect_boundaries(frames: list[tuple[int, np.ndarray]], rate: float, **kwargs: float) -> list[Boundary]:
    """Offline helper: run :class:`ShotDetector` over ``(frame_index, BGR frame)`` pairs."""
    det = ShotDetector(rate=rate, **kwargs)  # type: ignore[arg-type]
    out: list[Boundary] = []
    for idx, fr in frames:
        out += det.push(idx, frame_features(fr))
    out += det.flush()
    return sorted(out, key=lambda b: b.frame)
