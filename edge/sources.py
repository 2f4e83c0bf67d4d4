"""Video sources: a file, a camera index or an RTSP/HTTP URL opened through OpenCV and read incrementally.

Frames are pulled one at a time (memory stays bounded on an hour-long stream). :meth:`VideoSource.frames`
decodes every frame with ``grab()`` but converts to pixels (``retrieve()``) only the frames it is asked for:
``grab()`` alone is 2-2.5x faster than ``read()`` (STACK.md), so a detector that looks at every n-th frame does
not pay the colour conversion for the others.

:meth:`VideoSource.read_ahead` does the same in a reader thread that runs ahead of the consumer by a bounded
number of frames (OpenCV releases the GIL while it decodes and converts), optionally applying a pure-OpenCV
``prepare`` step (a thumbnail) there too: decode and analysis then overlap on a multi-core device. The thread is
stopped and joined when the consumer stops early, raises, or closes the source.

Errors are one line (:class:`VideoSourceError`): a missing file, a file that is not a video, a stream that cannot
be opened. A stream that breaks part-way (a truncated or corrupt file) is not an exception: iteration stops,
what decoded is kept and :attr:`VideoSource.error` says at which frame it broke.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's per-packet warnings; we report one line

import cv2
import numpy as np

__all__ = ["VideoSource", "VideoSourceError", "open_video", "parse_source"]

try:  # FFmpeg's own warnings about broken packets would interleave with our one-line errors
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:  # pragma: no cover - older OpenCV builds
    pass

_STREAM_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
# FFmpeg's "tty" demuxer renders any text file as a video of its characters: that is not a video to us.
_NOT_VIDEO_FOURCC = {b"ansi", b"tty\x00"}
DEFAULT_FPS = 30.0  # cameras and some streams report 0 fps; timestamps then assume this rate
_END = object()  # end of a read-ahead stream


class VideoSourceError(RuntimeError):
    """A video source cannot be used; the message is one line naming the source."""


def parse_source(src: str | int | Path) -> str | int:
    """Normalise a source: a camera index (``0`` or ``"0"``), a stream URL, or a file path (checked to exist).

    Raises
    ------
    VideoSourceError
        The path does not exist or is a directory.
    """
    if isinstance(src, int):
        return src
    s = str(src)
    if s.isdigit():
        return int(s)
    if s.lower().startswith(_STREAM_PREFIXES):
        return s
    if not os.path.exists(s):
        raise VideoSourceError(f"video not found: {s}")
    if os.path.isdir(s):
        raise VideoSourceError(f"video path is a directory, not a file: {s}")
    return s


@dataclass
class VideoSource:
    """An opened video stream.

    Attributes
    ----------
    name : str
        The source as given (path, URL or camera index).
    fps : float
        Frames per second reported by the container, or :data:`DEFAULT_FPS` when it reports none.
    frame_count : int | None
        Frames the container announces; ``None`` for cameras and live streams (unknown).
    width, height : int
        Frame size in pixels.
    frames_read : int
        Frames decoded so far.
    error : str | None
        Set when the stream broke before its announced end (truncated / corrupt): one line naming the frame.
    """

    name: str
    fps: float
    frame_count: int | None
    width: int
    height: int
    live: bool
    _cap: cv2.VideoCapture = field(repr=False)
    frames_read: int = 0
    error: str | None = None
    _stop: threading.Event | None = field(default=None, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    def frames(self, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
        """Yield ``(index, time_s, frame)`` for every ``every``-th frame (index 0, every, 2*every, ...).

        All frames are decoded (``grab``) so indices stay exact; only the yielded ones are converted to pixels
        (``retrieve``). ``frame`` is (H, W, 3) uint8 in OpenCV's BGR order and is a fresh array per frame.
        """
        if every < 1:
            raise ValueError("every must be >= 1")
        cap = self._cap
        while True:
            i = self.frames_read
            if not cap.grab():
                self._check_end(i)
                return
            self.frames_read = i + 1
            if i % every:
                continue
            ok, frame = cap.retrieve()
            if not ok or frame is None:
                self.error = f"{self.name}: could not decode frame {i}; kept frames 0..{i - 1}"
                return
            if frame.ndim == 2:  # some backends hand grey frames out
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            yield i, i / self.fps, frame

    def read_ahead(
        self, every: int = 1, depth: int = 4, prepare: Callable[[np.ndarray], Any] | None = None,
    ) -> Iterator[tuple[int, float, np.ndarray, Any]]:
        """Like :meth:`frames`, but decoded by a reader thread up to ``depth`` yielded frames ahead.

        Yields ``(index, time_s, frame, prepare(frame) or None)``; ``prepare`` runs in the reader thread
        (keep it to OpenCV calls, which release the GIL). Memory: at most ``depth + 2`` frames in flight. The
        thread stops and is joined when iteration ends, when the consumer breaks off or raises (the generator
        is closed), and in :meth:`close`. An exception in the reader (e.g. in ``prepare``) is re-raised here
        after the frames before it; a broken stream ends iteration with :attr:`error` set, as in :meth:`frames`.
        """
        if every < 1:
            raise ValueError("every must be >= 1")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if self._reader is not None:
            raise RuntimeError(f"{self.name}: a reader thread is already running on this source")
        q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        stop = threading.Event()
        failure: list[BaseException] = []

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for i, t, frame in self.frames(every):
                    if not put((i, t, frame, prepare(frame) if prepare is not None else None)):
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                failure.append(e)
            finally:
                put(_END)

        reader = threading.Thread(target=work, name=f"fedge-video-reader:{self.name}", daemon=True)
        self._stop, self._reader = stop, reader
        reader.start()
        try:
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    if (stop.is_set() or not reader.is_alive()) and q.empty():
                        break  # the source was closed under us (or the reader is gone): nothing more comes
                    continue
                if item is _END:
                    break
                yield item
            if failure:
                raise failure[0]
        finally:
            self._stop_reader()

    def _stop_reader(self) -> None:
        if self._reader is None or self._stop is None:
            return
        self._stop.set()
        if self._reader is not threading.current_thread():
            self._reader.join()
        self._stop, self._reader = None, None

    def _check_end(self, n: int) -> None:
        if self.live or self.frame_count is None:
            return
        # Containers round their frame count; a shortfall of more than one frame means the stream broke.
        if n < self.frame_count - 1:
            self.error = (
                f"{self.name}: stream broke at frame {n} of {self.frame_count} announced "
                f"(truncated or corrupt); kept frames 0..{n - 1}"
            )

    def close(self) -> None:
        """Stop a reader thread (if any), then release the capture."""
        self._stop_reader()
        self._cap.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video(src: str | int | Path, decode_threads: int | None = None) -> VideoSource:
    """Open a video file, a camera index or a stream URL.

    ``decode_threads``: threads FFmpeg may use to decode (None: OpenCV's default, one per core). A consumer
    that decodes in its own reader thread (:meth:`VideoSource.read_ahead`) asks for 1: its analysis already
    occupies the other core, and one decoder thread spends less CPU per frame than several.

    Raises
    ------
    VideoSourceError
        Missing file, a file OpenCV cannot open as video, or a file with no decodable frame.
    """
    s = parse_source(src)
    live = isinstance(s, int) or str(s).lower().startswith(_STREAM_PREFIXES)
    params = [cv2.CAP_PROP_N_THREADS, int(decode_threads)] if decode_threads else []
    cap = cv2.VideoCapture(s) if isinstance(s, int) else cv2.VideoCapture(s, cv2.CAP_FFMPEG, params)
    if not cap.isOpened() and not isinstance(s, int):
        cap = cv2.VideoCapture(s)  # let OpenCV pick another backend (e.g. image sequences)
    if not cap.isOpened():
        kind = "camera" if isinstance(s, int) else ("stream" if live else "file")
        why = "" if live else " (not a video, or truncated/corrupt beyond its header)"
        raise VideoSourceError(f"cannot open video {kind} {s}{why}")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        fps = DEFAULT_FPS
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
    h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0) & 0xFFFFFFFF
    if not live and (w <= 0 or h <= 0 or fourcc.to_bytes(4, "little") in _NOT_VIDEO_FOURCC):
        cap.release()
        raise VideoSourceError(f"not a video (no video stream): {s}")
    return VideoSource(name=str(s), fps=fps, frame_count=n if (n > 0 and not live) else None,
                       width=w, height=h, live=live, _cap=cap)
