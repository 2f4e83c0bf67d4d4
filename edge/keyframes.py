"""Keyframe extraction: shot detection over a video source, then one representative keyframe per shot.

Public API (stable; ``edge/ingest.py`` builds on it)
----------------------------------------------------
``iter_keyframes(src, **options) -> Iterator[Keyframe]``
    Streams keyframes in time order while the video decodes (bounded memory on an hour-long stream).
``extract_keyframes(src, **options) -> KeyframeReport``
    Runs the whole video and collects the result.
``Keyframe(frame, time, score, image, jpeg, start, end)``
    ``frame``: 0-based frame index; ``time``: seconds (frame / fps); ``score``: representativeness in [0, 1]
    (contrast x detail x stillness); ``image``: (h, w, 3) uint8 RGB, longer side <= ``max_side``;
    ``jpeg``: the same image JPEG-encoded, ready for storage; ``start``, ``end``: the time span in seconds the
    keyframe represents, its shot or, for a long shot (or a camera without cuts), its ``max_interval`` chunk;
    ``open_start``, ``open_end``: that side of the span is a chunk edge inside a shot, not a cut (nor the
    stream's start or end).
``KeyframeReport(video, fps, frames, boundaries, keyframes, seconds, error)``
    ``boundaries``: first frame of each new shot (0-based, PySceneDetect's scene-start convention; for a
    gradual transition a frame inside it); ``seconds``: wall time spent decoding and detecting; ``error``: one
    line when the stream broke part-way (what decoded before is kept), else ``None``.

``src`` is a path, a camera index, a URL or an already opened :class:`fedge.edge.sources.VideoSource`.
Options (keyword-only): ``min_interval`` (s, default 0.25): no two keyframes closer than this;
``max_interval`` (s, default 4.0): a long shot gets a keyframe at least this often; ``max_side`` (px, 320);
``jpeg_quality`` (90); ``stride`` (analyse every n-th frame; default ``round(fps / 10)``, i.e. about 10
analysed frames per second: every frame is still decoded, but only analysed ones are converted to pixels,
the speed limit being decode); ``on_boundary`` (callback per detected boundary frame); ``read_ahead``
(analysed frames a reader thread decodes ahead of the detector, FFmpeg on one thread, so decode and analysis
overlap on a multi-core device; default :func:`default_read_ahead`, about 24 MiB of frames; 0: decode inline,
FFmpeg's default threads).

Selection: the frames of a shot (or of each ``max_interval`` chunk of a long shot) compete on ``score``; the
winner is the keyframe. Frames inside a transition score low (no contrast, motion), so they rarely win.

Streaming and memory: boundaries are certain at most ``ShotDetector.max_delay`` analysed frames (about 5 s)
after the fact, so keyframes come out that far behind the stream; the analysed frames of that window are kept
(decimated to about twice ``max_side``), plus one candidate per open shot: bounded, whatever the stream length.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fedge.common.media.frame_features import FrameFeatures, frame_features
from fedge.common.media.shots import Boundary, ShotDetector
from fedge.edge.sources import VideoSource, open_video

__all__ = [
    "Keyframe", "KeyframeReport", "default_read_ahead", "default_stride", "extract_keyframes", "iter_keyframes",
    "thumbnail",
]

READ_AHEAD_BYTES = 24 << 20  # decoded frames the reader thread may hold ahead of the detector, in bytes
READ_AHEAD_MAX = 32  # ... and in analysed frames (about 3 s of video at 10 analysed frames per second)
ANALYSIS_RATE = 10.0  # analysed frames per second: cuts located to +-1 frame at 30 fps, 2-frame flashes seen


@dataclass(frozen=True)
class Keyframe:
    """One keyframe: index, timestamp, representativeness, RGB image and its JPEG bytes."""

    frame: int
    time: float
    score: float
    image: np.ndarray = field(repr=False)
    jpeg: bytes = field(repr=False)
    start: float | None = None  # span represented: [start, end) s (None: built without one)
    end: float | None = None
    open_start: bool = False  # the span starts / ends at a chunk edge inside a shot, not at a cut
    open_end: bool = False


@dataclass
class KeyframeReport:
    """What :func:`extract_keyframes` found in one video."""

    video: str
    fps: float
    frames: int
    boundaries: list[int]
    keyframes: list[Keyframe]
    seconds: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``fedge edge keyframes --json`` object (no image bytes)."""
        out: dict[str, Any] = {
            "video": self.video,
            "fps": self.fps,
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "boundaries": list(self.boundaries),
            "keyframes": [{"frame": k.frame, "time": round(k.time, 4), "score": round(k.score, 4)}
                          for k in self.keyframes],
        }
        if self.error:
            out["error"] = self.error
        return out


def default_read_ahead(width: int, height: int) -> int:
    """Analysed frames the reader thread may decode ahead: :data:`READ_AHEAD_BYTES` of BGR frames, 4 to
    :data:`READ_AHEAD_MAX` (32 at 640x360, 9 at 720p, 4 at 1080p and above).

    The detector's work comes in bursts (a cut's checks, a transition's blend fits, a shot's keyframe JPEG)
    while decoding runs at an even pace: a deeper queue lets the reader keep decoding through a burst, so
    both cores stay busy and decode stays the speed limit.
    """
    if width <= 0 or height <= 0:  # some streams report no size before their first frame
        return 4
    return int(min(READ_AHEAD_MAX, max(4, READ_AHEAD_BYTES // (int(width) * int(height) * 3))))


def _open(src: str | int | Path | VideoSource, read_ahead: int | None) -> VideoSource:
    """``src`` as a source: FFmpeg on one thread when a reader thread decodes (read_ahead != 0), else its
    default threads."""
    if isinstance(src, VideoSource):
        return src
    return open_video(src, decode_threads=1 if read_ahead != 0 else None)


def default_stride(fps: float) -> int:
    """Analyse about :data:`ANALYSIS_RATE` frames per second."""
    return max(1, round(fps / ANALYSIS_RATE))


def _score(feat: FrameFeatures, motion: float) -> float:
    """Representativeness in [0, 1]: enough contrast, visible detail, little motion."""
    contrast = min(1.0, feat.contrast / 40.0)
    detail = feat.sharpness / (feat.sharpness + 4.0)
    still = 1.0 / (1.0 + 4.0 * motion)
    return float(contrast * detail * still)


@dataclass
class _Cand:
    frame: int
    time: float
    score: float
    pixels: np.ndarray  # BGR frame as decoded (a reference, not a copy)


def thumbnail(bgr: np.ndarray, *, max_side: int = 320, jpeg_quality: int = 90) -> tuple[np.ndarray, bytes]:
    """A stored keyframe's image from a decoded (H, W, 3) uint8 BGR frame or photo: shrunk (area filter) so its
    longer side is at most ``max_side``, as (h, w, 3) uint8 RGB and as JPEG bytes."""
    img = bgr
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(img[:, :, ::-1]), buf.tobytes()


def _encode(c: _Cand, max_side: int, quality: int, span: tuple[float, float], open_sides: tuple[bool, bool]
            ) -> Keyframe:
    rgb, jpeg = thumbnail(c.pixels, max_side=max_side, jpeg_quality=quality)
    return Keyframe(frame=c.frame, time=c.time, score=round(c.score, 6), image=rgb, jpeg=jpeg,
                    start=span[0], end=span[1], open_start=open_sides[0], open_end=open_sides[1])


class _Selector:
    """Keeps the best candidate of the current shot chunk; emits on boundaries and every ``max_interval``.

    A chunk spans from its first analysed frame to the boundary, the next chunk's first frame, or (at the end
    of the stream) one analysis step past its last frame: the span its keyframe represents. A chunk of a long
    shot that emits no keyframe (every frame too close to the last keyframe) joins the next chunk's span, so
    the spans of a shot leave no part of it out.
    """

    def __init__(self, min_interval: float, max_interval: float, max_side: int, quality: int, step_s: float) -> None:
        self.min_interval, self.max_interval = min_interval, max_interval
        self.max_side, self.quality, self.step_s = max_side, quality, step_s
        self.best: _Cand | None = None
        self.chunk_start: float | None = None
        self.span_start: float | None = None  # where the next keyframe's span starts
        self.span_open = False  # ... and whether there is a chunk edge (not a cut) there
        self.chunk_last = -np.inf
        self.last_time = -np.inf

    def add(self, c: _Cand) -> list[Keyframe]:
        out: list[Keyframe] = []
        if self.chunk_start is None:
            self.chunk_start = c.time
        elif c.time - self.chunk_start >= self.max_interval:
            out += self.close(c.time, cut=False)
            self.chunk_start = c.time
        if self.span_start is None:
            self.span_start = self.chunk_start
        if c.time - self.last_time >= self.min_interval and (self.best is None or c.score > self.best.score):
            self.best = c
        self.chunk_last = c.time
        return out

    def close(self, end: float | None = None, *, cut: bool = True) -> list[Keyframe]:
        """Emit the chunk's keyframe; ``end``: where the chunk ends (default: one step past its last frame);
        ``cut``: the shot ends here (else a chunk of a long shot does)."""
        out: list[Keyframe] = []
        if self.best is not None and self.span_start is not None:
            stop = self.chunk_last + self.step_s if end is None else max(end, self.chunk_last)
            out.append(_encode(self.best, self.max_side, self.quality, (self.span_start, stop),
                               (self.span_open, not cut)))
            self.last_time = self.best.time
            self.span_start, self.span_open = None, not cut
        elif cut:
            self.span_start, self.span_open = None, False  # a shot without a keyframe: its time is in no span
        self.best, self.chunk_start = None, None
        return out


def iter_keyframes(
    src: str | int | Path | VideoSource,
    *,
    min_interval: float = 0.25,
    max_interval: float = 4.0,
    max_side: int = 320,
    jpeg_quality: int = 90,
    stride: int | None = None,
    on_boundary: Callable[[Boundary], None] | None = None,
    read_ahead: int | None = None,
) -> Iterator[Keyframe]:
    """Yield keyframes in time order while decoding ``src`` (see the module docstring for the options)."""
    if not 0 <= min_interval <= max_interval < math.inf or max_interval <= 0:  # NaN fails too
        raise ValueError("need 0 <= min_interval <= max_interval, max_interval > 0 and finite")
    if max_side < 8:
        raise ValueError("max_side must be >= 8")
    if read_ahead is not None and read_ahead < 0:
        raise ValueError("read_ahead must be >= 0")
    video = _open(src, read_ahead)
    if read_ahead is None:
        read_ahead = default_read_ahead(video.width, video.height)
    step = stride or default_stride(video.fps)
    if step < 1:
        raise ValueError("stride must be >= 1")
    det = ShotDetector(rate=video.fps / step)
    # Boundaries can still be reported this many analysed frames back: only older candidates are settled.
    delay = det.max_delay
    pending: deque[_Cand] = deque()
    sel = _Selector(min_interval, max_interval, max_side, jpeg_quality, step / video.fps)

    def on_boundaries(bs: list[Boundary]) -> Iterator[Keyframe]:
        for b in bs:
            if on_boundary is not None:
                on_boundary(b)
            while pending and pending[0].frame < b.frame:
                yield from sel.add(pending.popleft())
            # the shot ends where the next one's first analysed frame starts
            yield from sel.close(pending[0].time if pending else None)

    prev: FrameFeatures | None = None
    stream: Generator[tuple[int, float, np.ndarray, Any], None, None]
    if read_ahead:
        # thumbnails in this thread: the reader (decode) is the busier one
        stream = video.read_ahead(step, read_ahead)
    else:
        stream = ((i, t, f, None) for i, t, f in video.frames(every=step))
    try:
        for idx, t, frame, thumb in stream:
            feat = frame_features(frame, thumb=thumb)
            bs = det.push(idx, feat)
            motion = det.last_step.struct if det.last_step is not None else 0.0
            # keep at most ~2x max_side of pixels per pending candidate (bounded memory on 4K streams)
            k = max(frame.shape[:2]) // (2 * max_side)
            pixels = frame if k < 2 else np.ascontiguousarray(frame[::k, ::k])
            pending.append(_Cand(idx, t, _score(feat, motion), pixels))
            yield from on_boundaries(bs)
            while len(pending) > delay:
                yield from sel.add(pending.popleft())
            prev = feat
        yield from on_boundaries(det.flush())
        while pending:
            yield from sel.add(pending.popleft())
        yield from sel.close()
    finally:
        stream.close()  # with read_ahead: stops and joins the reader thread
        if not isinstance(src, VideoSource):
            video.close()
    del prev


def extract_keyframes(src: str | int | Path | VideoSource, **options: Any) -> KeyframeReport:
    """Run :func:`iter_keyframes` over the whole video and report (see the module docstring).

    Raises
    ------
    fedge.edge.sources.VideoSourceError
        The source cannot be opened (missing file, not a video).
    """
    t0 = time.perf_counter()
    video = _open(src, options.get("read_ahead"))
    boundaries: list[int] = []
    try:
        user_cb = options.pop("on_boundary", None)

        def cb(b: Boundary) -> None:
            boundaries.append(b.frame)
            if user_cb is not None:
                user_cb(b)

        kfs = list(iter_keyframes(video, on_boundary=cb, **options))
    finally:
        if not isinstance(src, VideoSource):
            video.close()
    seconds = time.perf_counter() - t0
    return KeyframeReport(video=video.name, fps=video.fps, frames=video.frames_read,
                          boundaries=sorted(set(boundaries)), keyframes=kfs, seconds=seconds, error=video.error)

