"""Streaming search for gradual shot transitions (dissolves, fades through black, wipes) in a :class:`ShotWindow`.

Gradual transitions change little per step, so no single step is an outlier. They are found with triples of
analysed frames ``(a, m, b)`` at several spans whose middle frame is a transition frame
(:func:`fedge.common.media.transitions.transition_fit`) while the ends differ like two shots do and the same span
around them changes much less. Among the accepted triples of one transition, the one whose blend is closest to
half-and-half gives the boundary. A span h is tried at every (h/2)-th end sample only: a transition that needs
it lasts about 2h samples and still gets several triples, and the wide spans (a motion-compensated distance
each, in every moving shot) cost less. The histograms give a second, motion-blind test (:meth:`_hist_gradual`).
"""

from __future__ import annotations

import cv2
import numpy as np

from fedge.common.media.frame_features import hist_distance, median_block, struct_distance
from fedge.common.media.shot_window import STEADY_MAX, ShotWindow
from fedge.common.media.transitions import transition_fit

__all__ = ["GRADUAL_MIN", "HIST_GRADUAL_MIN", "GradualSearch"]

HIST_GRADUAL_MIN = 0.3  # histogram change between the ends of a gradual transition (a cut's hist floor)
GRADUAL_MIN = 0.35  # struct distance between the ends of a gradual transition (as for a cut)


def _span_due(h: int, b: int) -> bool:
    """Whether gradual triples of span ``h`` (samples) are tried with their end at sample ``b``."""
    return b % max(1, h // 2) == 0


class GradualSearch:
    """Gradual transitions among the samples of a :class:`ShotWindow` that a detector fills and cuts.

    Call :meth:`step` with each sample ``b`` once the samples up to ``b + 2 * max_span`` are in the window, and
    :meth:`close` at the end of the stream; each returns the transitions it completed, as
    ``(sample, frame, score)`` of the transition's middle frame. ``trace``: a list to record candidates in.
    """

    def __init__(self, window: ShotWindow, max_span: int, trace: list | None = None) -> None:
        self._w = window
        self.trace = trace
        spans, h = [], 1
        while h < max_span:
            spans.append(h)
            h *= 2
        spans.append(max_span)
        self._spans: list[int] = sorted(set(spans))
        self._H = max_span
        self._block = 0  # gradual triples must start at or after this sample (end of the last transition)
        self._group: list[tuple[float, float, int, int, int, float]] = []  # (|share-.5|, -d, m, a, b, score)
        self._found: list[tuple[int, int, float]] = []  # (sample, frame, score) completed, not yet returned
        self._struct_cache: dict[tuple[int, int], float] = {}

    def step(self, b: int) -> list[tuple[int, int, float]]:
        """Look for transitions whose triple ends at sample ``b``; return those completed."""
        self._search(b)
        return self._take()

    def close(self) -> list[tuple[int, int, float]]:
        """End of stream: complete the open transition, if any."""
        self._close_group()
        return self._take()

    def blend(self, a: int, m: int, b: int) -> tuple[float, float, float] | None:
        """:func:`transition_fit` of samples ``a``, ``m``, ``b`` (None when one is not held)."""
        fa, fm, fb = self._w.get(a), self._w.get(m), self._w.get(b)
        if fa is None or fm is None or fb is None:
            return None
        return transition_fit(fa.feat, fm.feat, fb.feat)

    def _take(self) -> list[tuple[int, int, float]]:
        found, self._found = self._found, []
        return found

    def _travel(self, a: int, b: int) -> float:
        """Distance the view moved between samples a and b (sum of step translations, in frame widths)."""
        x = y = 0.0
        for k in range(a + 1, b + 1):
            s = self._w.get(k)
            if s is not None and s.step is not None and s.step.response > 0.2 and s.step.struct < STEADY_MAX:
                x += s.step.dx  # only translations that explain their step (not a transition's noise)
                y += s.step.dy
        return float(np.hypot(x, y))

    def _struct(self, a: int, b: int) -> float | None:
        """Structural distance of samples a and b (cached: the gradual test asks for most pairs three times)."""
        d = self._struct_cache.get((a, b))
        if d is not None:
            return d
        fa, fb = self._w.get(a), self._w.get(b)
        if fa is None or fb is None:
            return None
        d = self._struct_cache[(a, b)] = struct_distance(fa.feat.luma, fb.feat.luma)[0]
        if len(self._struct_cache) > 4 * self._w.maxlen:
            oldest = self._w.oldest
            self._struct_cache = {k: v for k, v in self._struct_cache.items() if k[0] >= oldest}
        return d

    def _search(self, b: int) -> None:
        """Look for transitions whose triple ends at sample b (frames up to b + 2*H are known).

        A triple of span h is tried at every (h/2)-th end sample only (:func:`_span_due`): a transition that
        needs span h lasts about 2h samples, so it still gets several triples, while the wide spans, a
        motion-compensated distance each in every moving shot, cost a half or a quarter as much.
        """
        fb = self._w.get(b)
        if fb is None:
            return
        spans = [h for h in self._spans if _span_due(h, b) and b - 2 * h >= self._block
                 and not self._w.cut_between(b - 2 * h, b)]
        if spans:
            fa = self._w.get(b - 2 * spans[-1])
            # cheap pre-filter: the ends of the widest span barely differ (no compensation needed to say so)
            if fa is None or median_block(cv2.absdiff(fa.feat.luma, fb.feat.luma)) < GRADUAL_MIN:
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
            fit = self.blend(a, m, b)
            if fit is None:
                continue
            residual, share, _ = fit
            # The change must be confined to [a, b]: the same span before a and after b changes much less.
            # A zoom or a steady camera move changes every window alike; a transition joins calmer shots.
            outside = [self._struct(x, y) for x, y in ((a - 2 * h, a), (b, b + 2 * h))
                       if not self._w.cut_between(x, y) and x >= 0 and y < self._w.n]
            known = [o for o in outside if o is not None]
            out_d = max(known, default=0.0)
            calm = min(known, default=0.0)
            if self.trace is not None:
                self.trace.append(("g", self._w.get(a).frame, self._w.get(m).frame, fb.frame,  # type: ignore[union-attr]
                                   round(d, 3), round(residual, 3), round(share, 3), round(out_d, 3)))
            if d < 2.0 * calm or d < 1.25 * out_d:
                continue  # at least one side much calmer (a shaky shot may end in a still one), none as busy
            if not known and d < 2 * GRADUAL_MIN:
                continue  # nothing around to compare with (cuts or the stream's ends): ask for more change
            if self._group and (m > max(g[4] for g in self._group) + 2
                                or self._w.cut_between(max(g[2] for g in self._group), m)):
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
            if h < 2 or not _span_due(h, b) or a < self._block or self._w.cut_between(a, b):
                continue
            xs = [self._w.get(k) for k in range(a, b + 1)]
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
                if x < 0 or y >= self._w.n or self._w.cut_between(x, y):
                    continue
                fs = [self._w.get(k) for k in range(x + 1, y + 1)]
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
                self.trace.append(("h", self._w.get(a).frame, self._w.get(m).frame, self._w.get(b).frame,  # type: ignore[union-attr]
                                   round(dab, 3), round(share, 3), round(inside, 3), [round(o, 3) for o in outside]))
            if self._group and (m > max(g[4] for g in self._group) + 2
                                or self._w.cut_between(max(g[2] for g in self._group), m)):
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
        self._block = max(self._block, hi)
        # a cut inside (or right next to) the same transition was already reported: a cut up to two samples
        # before the first triple that carries at most half of the change was the transition's first step
        if any(lo < c <= hi or abs(c - best[2]) <= 2 or (lo - 2 <= c <= lo and self._part_of(c, hi))
               for c in self._w.cuts):
            return
        m = self._w.get(best[2])
        if m is not None:
            self._found.append((best[2], m.frame, round(float(best[5]), 3)))
