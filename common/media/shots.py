"""Shot-boundary detection: an adaptive streaming detector over analysed frames (pure kernels).

Everything here works on arrays (OpenCV BGR frames in, numbers out): no files, no capture. The edge keyframe
extractor (``edge/keyframes.py``) feeds it decoded frames; the cloud's curation can feed it the same way.

Its cues come from :mod:`fedge.common.media.frame_features` (each frame's thumbnail features and the ``hist`` /
``struct`` / ``shift`` cues between two frames); gradual transitions are found by :mod:`fedge.common.media.gradual`.

How it decides, and why the thresholds are not tuned to any test video
----------------------------------------------------------------------
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
outlier: :class:`~fedge.common.media.gradual.GradualSearch` looks at triples of frames instead, and a step into or
out of a transition frame is not a cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.common.media.frame_features import (
    FrameFeatures,
    PairScores,
    frame_features,
    hist_distance,
    pair_scores,
)
from fedge.common.media.gradual import GradualSearch
from fedge.common.media.shot_window import STEADY_MAX, Sample, ShotWindow
from fedge.common.media.transitions import DIP_RATIO

__all__ = ["Boundary", "ShotDetector", "detect_boundaries"]

# What a shot change means physically (see the module docstring); the adaptive z-test does the real work.
CUT_MIN = {"hist": 0.30, "struct": 0.35, "jump": 0.04}
# Spread floors for the z-test: the smallest MAD we trust (a static synthetic shot has MAD ~ 0).
SPREAD_FLOOR = {"hist": 0.02, "struct": 0.03, "jump": 0.006}
RECENT_RATIO = 1.5  # a cut exceeds the shot's last two steps by this factor


@dataclass(frozen=True)
class Boundary:
    """A detected shot boundary: the first frame of the new shot (0-based), or a frame inside a transition."""

    frame: int
    kind: str  # "cut" | "gradual"
    score: float


def _small_median(v: list[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


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
        self._H = hmax
        # the samples kept (bounded) and the cuts among them, shared with the gradual search
        self._buf = ShotWindow(maxlen=max(self._past, 6 * hmax) + self.lookahead + 8)
        self._grad = GradualSearch(self._buf, max_span=hmax, trace=self.trace)
        self._decided = 0  # samples whose cut decision is made
        self._ready: list[tuple[int, Boundary]] = []  # (sample, boundary) decided but not yet released

    @property
    def max_delay(self) -> int:
        """Most analysed frames by which a released boundary can lag the newest pushed frame."""
        return self.lookahead + 5 * self._H + 2

    @property
    def last_step(self) -> PairScores | None:
        """Cues between the two most recently pushed frames (None before the second)."""
        last = self._buf.last
        return None if last is None else last.step

    # ------------------------------------------------------------------ streaming API
    def push(self, frame: int, feat: FrameFeatures) -> list[Boundary]:
        """Add one analysed frame; return the boundaries that became certain (in frame order)."""
        last = self._buf.last
        step = pair_scores(last.feat, feat) if last is not None else None
        hstep = hist_distance(last.feat, feat) if last is not None else 0.0
        self._buf.push(Sample(frame, feat, step, hstep=hstep))
        while self._decided < self._buf.n - self.lookahead:
            self._advance(self._decided)
            self._decided += 1
        return self._release(self._buf.n - 1 - self.max_delay)

    def flush(self) -> list[Boundary]:
        """Decide the remaining samples (end of stream) and return their boundaries."""
        while self._decided < self._buf.n:
            self._advance(self._decided)
            self._decided += 1
        for b in range(max(0, self._buf.n - 2 * self._H), self._buf.n):
            self._add_gradual(self._grad.step(b))
        self._add_gradual(self._grad.close())
        return self._release(None)

    # ------------------------------------------------------------------ internals
    def _advance(self, i: int) -> None:
        self._decide_cut(i)
        if i - 2 * self._H >= 0:
            self._add_gradual(self._grad.step(i - 2 * self._H))

    def _add_gradual(self, found: list[tuple[int, int, float]]) -> None:
        self._ready += [(s, Boundary(frame=f, kind="gradual", score=score)) for s, f, score in found]

    def _release(self, upto: int | None) -> list[Boundary]:
        self._ready.sort(key=lambda sb: sb[1].frame)
        out = [b for s, b in self._ready if upto is None or s <= upto]
        self._ready = [(s, b) for s, b in self._ready if not (upto is None or s <= upto)]
        if len(self._buf.cuts) > 64:
            self._buf.cuts = self._buf.cuts[-32:]
        return out

    def _shift(self, i: int) -> np.ndarray | None:
        s = self._buf.get(i)
        return None if s is None or s.step is None else np.array([s.step.dx, s.step.dy])

    def _motion(self, rng: range) -> np.ndarray | None:
        """Median translation over the steady steps in ``rng`` (a few steps: plain Python is faster)."""
        xs, ys = [], []
        for k in rng:
            s = self._buf.get(k)
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
        start = self._buf.shot_start(i - 1)
        before = self._motion(range(max(start + 1, i - 3), i))
        after = self._motion(range(i + 1, i + 4))
        if before is None or after is None:  # motion unknown on one side: no evidence
            return 0.0
        return float(min(np.linalg.norm(si - before), np.linalg.norm(si - after)))

    def _jump_of(self, k: int) -> float | None:
        """The jump of step k, once the three steps after it are known (cached)."""
        s = self._buf.get(k)
        if s is None or s.step is None:
            return None
        if s.jump is None and k + 3 < self._buf.n:
            s.jump = self._jump(k) if s.step.response > 0.05 else 0.0
        return s.jump

    def _cues(self, i: int) -> dict[str, float]:
        s = self._buf.get(i)
        assert s is not None and s.step is not None
        jump = self._jump_of(i)
        out = {"hist": s.step.hist, "struct": s.step.struct}
        prev = self._buf.get(i - 1)
        if jump is not None and prev is not None and not (prev.feat.flat or s.feat.flat):  # noise has no shift
            out["jump"] = jump
        return out

    def _baseline(self, i: int) -> list[dict[str, tuple[float, float]]]:
        """Median and robust spread of each cue, separately over the steps before and after step i.

        Before: steps of the current shot only (up to ``window_s``); after: the next ``lookahead`` steps
        (the flash partner i+1 left out). A cut is a step that is unusual for the shot it ends *and* for the
        shot it starts; a shot that turns noisy or starts to zoom is unusual only for what came before.
        """
        lo = max(1, i - self._past, self._buf.shot_start(i - 1) + 1)
        sides = []
        for ks in (range(lo, i), range(i + 2, i + self.lookahead + 1)):
            vals: dict[str, list[float]] = {"hist": [], "struct": [], "jump": []}
            for k in ks:
                s = self._buf.get(k)
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
        start = self._buf.shot_start(i - 1)
        motion = self._motion(range(max(start + 1, i - 4), i))
        for m in range(1, self.flash_samples + 1):
            for pre, post in ((i - 1, i + m), (i - 1 - m, i)):
                fa, fb = self._buf.get(pre), self._buf.get(post)
                if pre < start or fa is None or fb is None:
                    continue
                p = pair_scores(fa.feat, fb.feat)
                expect = (post - pre) * motion if motion is not None else np.zeros(2)
                jump = float(np.linalg.norm(np.array([p.dx, p.dy]) - expect))
                if self._similar({"hist": p.hist, "struct": p.struct, "jump": jump}, base):
                    return True
        return False

    def _in_gradual(self, i: int) -> bool:
        """A step into or out of a blend or a contrast-less frame belongs to a gradual transition, not a cut."""
        prev, cur = self._buf.get(i - 1), self._buf.get(i)
        if prev is None or cur is None:
            return True
        if self._level_step(i):
            return False  # a fade changes contrast over several frames, a cut (to a dark shot too) at once
        # Next to a frame without contrast (the bottom of a fade), structure emerges from quantisation and
        # noise step by step: those steps belong to the fade, which the gradual test reports once. Only steps
        # between two dim frames, though: a step to or from a lit frame next to a fade or a flash is a cut.
        around = [x.feat for x in map(self._buf.get, range(i - 4, i + 4)) if x is not None]
        peak = max(f.contrast for f in around)
        if max(prev.feat.contrast, cur.feat.contrast) < DIP_RATIO * peak and any(f.flat for f in around):
            return True
        # A step at the bottom of a contrast valley (much more contrast a few frames before and after): a fade
        # through black that the sampling caught without a black frame. Both frames of the step are dim: in a
        # fade the content changes where there is least contrast.
        high = max(prev.feat.contrast, cur.feat.contrast)
        before = [x.feat.contrast for x in map(self._buf.get, range(i - 5, i - 1)) if x is not None]
        after = [x.feat.contrast for x in map(self._buf.get, range(i + 1, i + 5)) if x is not None]
        if before and after and high < DIP_RATIO * min(max(before), max(after)):
            return True
        start = self._buf.shot_start(i - 1)
        triples = [(i - 1, i, i + k) for k in range(1, 3)]
        triples += [(i - 1 - k, i - 1, i) for k in range(1, 3) if i - 1 - k >= start]
        for a, m, b in triples:
            if self._grad.blend(a, m, b) is not None:
                return True
        return False

    def _level_step(self, i: int) -> bool:
        """Contrast and brightness are steady over the two samples before step i and the two from i on, but
        differ across it: one step from one exposure to another, which a fade (gradual by definition) is not."""
        xs = [self._buf.get(k) for k in (i - 2, i - 1, i, i + 1)]
        if any(x is None for x in xs) or self._buf.cut_between(i - 2, i - 1) or self._buf.cut_between(i, i + 1):
            return False
        c = [x.feat.contrast for x in xs]  # type: ignore[union-attr]
        m = [x.feat.mean for x in xs]  # type: ignore[union-attr]

        def same(p: float, q: float, tol: float) -> bool:
            return abs(p - q) <= tol * max(p, q) + 1.0

        steady = same(c[0], c[1], 0.15) and same(c[2], c[3], 0.15) and same(m[0], m[1], 0.1) and same(m[2], m[3], 0.1)
        return steady and not (same(c[1], c[2], 0.3) and same(m[1], m[2], 0.2))

    def _decide_cut(self, i: int) -> None:
        s = self._buf.get(i)
        if s is None or s.step is None or i < 1:
            return
        cues = self._cues(i)
        if all(v < CUT_MIN[c] for c, v in cues.items()) and self.trace is None:
            return  # below every floor: cannot be a cut, skip the baseline (most steps end here)
        base = self._baseline(i)
        recent: dict[str, float] = {}
        for k in range(max(self._buf.shot_start(i - 1) + 1, i - 2), i):
            sk = self._buf.get(k)
            if sk is not None and sk.step is not None:
                for c, v in self._cues(k).items():
                    recent[c] = max(recent.get(c, 0.0), v)
        z = self._fires(cues, base, recent, level=self._level_step(i))
        if self.trace is not None:
            self.trace.append((s.frame, {c: round(v, 3) for c, v in self._cues(i).items()},
                               [{c: (round(m, 3), round(sp, 3)) for c, (m, sp) in side.items()} for side in base], z))
        if z > 0 and not self._is_flash(i, base) and not self._in_gradual(i):
            prev = self._buf.get(i - 1)
            assert prev is not None
            frame = prev.frame + (s.frame - prev.frame + 1) // 2
            self._buf.cuts.append(i)
            self._ready.append((i, Boundary(frame=frame, kind="cut", score=round(float(z), 3))))


def detect_boundaries(frames: list[tuple[int, np.ndarray]], rate: float, **kwargs: float) -> list[Boundary]:
    """Offline helper: run :class:`ShotDetector` over ``(frame_index, BGR frame)`` pairs."""
    det = ShotDetector(rate=rate, **kwargs)  # type: ignore[arg-type]
    out: list[Boundary] = []
    for idx, fr in frames:
        out += det.push(idx, frame_features(fr))
    out += det.flush()
    return sorted(out, key=lambda b: b.frame)
