"""Ingest: camera and microphone streams -> aligned, quality-gated, compact samples in the SampleStore.

The device's data-governance path (DESIGN.md): modality detection -> per-modality processing (keyframes from
the video, a streaming log-mel from the audio) -> alignment -> quality gate -> accept / clean / reject ->
store.

Alignment (``align="shot"``, the default): a keyframe represents a time span, its shot (or, in a long shot or
a camera without cuts, its ``max_interval`` chunk, whose windows may reach half a window past a chunk edge so
that a word across it is not cut); its audio is the window of ``frames`` log-mel frames inside that span
(shifted by ``audio_offset``) where the sound is (:mod:`fedge.edge.align`: the loudest window, and with
``max_per_shot > 1`` one more window per further separate sound above the stream's own noise floor, each
stored as a sample with the same keyframe). ``align="keyframe"``: the window centred on the keyframe's time
(shifted inwards at the ends of the audio; none when the time lies outside the audio). A microphone-only
device stores windows every ``mic_stride`` seconds: centred on each stride instant, or (``"shot"``, when the
stride is longer than a window) chosen like a shot's in each span ``[k * mic_stride, (k + 1) * mic_stride)``. With the default parameters
(16 kHz, n_fft 512, hop 256, 40 mels, 32 frames) a window spans 0.53 s and is exactly the model's audio input.
The window's dB are ``power_to_db(mel, ref=1, top_db=80)`` applied to that window alone (a stream has no global
maximum). A camera-only device (no audio given, and no audio track in the video) stores image-only samples.
The report says which modalities the device had and why.

Labels: one ``label`` for every sample, or labelled time spans (:mod:`fedge.edge.labels`): a sample takes the label
of the span its stream time falls in (the keyframe's time; a microphone-only window's centre), none outside
every span; a span past the end of the recording is reported as the run's error once the stream has ended
(what was stored stays).

Both streams are consumed incrementally: the audio is featurised only as far as the latest keyframe's span
needs (a shot's samples are stored when the keyframe detector closes the shot), and features older than a few
seconds are released, so memory stays bounded on an hour-long recording.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.common.media.mel import MelParams
from fedge.edge.audio_source import AudioSource, AudioSourceError, open_audio
from fedge.edge.audio_windows import AudioWindows, Window
from fedge.edge.labels import Labels
from fedge.edge.quality import QualityGate
from fedge.edge.resume import resume_point, source_key, stored_keys, track, track_many
from fedge.edge.store import SampleStore, StoreBudgetError, StoreError, StoreFullError

if TYPE_CHECKING:
    from fedge.edge.images import ImageSource

__all__ = ["IngestError", "IngestReport", "ingest"]

_KEEP_S = 10.0  # seconds of audio features kept behind the latest keyframe (keyframes arrive in time order)
ALIGN_MODES = ("shot", "keyframe")
MAX_SECONDS = 1e6  # bound of a stride or offset in seconds (11.6 days): larger is a typo, and overflows frame maths


class IngestError(RuntimeError):
    """Nothing could be ingested (no source, no modality); the message is one line."""


@dataclass
class IngestReport:
    """What one :func:`ingest` run did."""

    video: str | None = None
    audio: str | None = None
    modalities: tuple[str, ...] = ()  # what the device provided
    notes: list[str] = field(default_factory=list)  # modality detection, partial decodes, aborts
    frames_decoded: int = 0
    keyframes: int = 0  # extracted from the video
    keyframes_kept: int = 0  # stored with their image
    audio_seconds: float = 0.0  # featurised
    audio_windows: int = 0  # stored with audio
    samples_stored: int = 0
    samples_resumed: int = 0  # stored by an earlier run of the same recording, skipped by its resume point
    samples_rejected: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # "<modality>:<reason>" -> count
    bytes_in: int = 0  # size of the raw source files
    bytes_stored: int = 0  # payload bytes of the stored samples
    first_id: int | None = None
    last_id: int | None = None
    seconds: float = 0.0  # wall time
    # set when the run stopped early (disk full, bad samples) or a labelled span lies past the end of the
    # recording: what was stored stays
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        d = dict(self.__dict__)
        d["modalities"] = list(self.modalities)
        return d

    def summary(self) -> str:
        """The human-readable summary the CLI prints."""
        ratio = f" ({self.bytes_in / self.bytes_stored:.1f}x smaller)" if self.bytes_stored else ""
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        lines = [
            f"modalities      : {'+'.join(self.modalities) or 'none'}",
            f"frames decoded  : {self.frames_decoded}",
            f"keyframes kept  : {self.keyframes_kept} of {self.keyframes}",
            f"seconds of audio: {self.audio_seconds:.2f}",
            (f"samples stored  : {self.samples_stored} (audio windows {self.audio_windows}), "
            f"rejected {self.samples_rejected}"),
            f"removed/rejected by reason: {rej}",
            f"bytes in (raw)  : {self.bytes_in:,}   bytes stored: {self.bytes_stored:,}{ratio}",
            f"wall time       : {self.seconds:.2f} s",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _file_size(src: str | None) -> int:
    return os.path.getsize(src) if src and os.path.isfile(src) else 0


def ingest(
    *,
    video: str | int | Path | ImageSource | None = None,
    audio: str | Path | None = None,
    store: SampleStore | str | Path,
    label: int | None = None,
    split: str = "train",
    audio_from_video: bool = True,
    sr: int = 16000,
    n_fft: int = 512,
    hop_length: int = 256,
    n_mels: int = 40,
    frames: int = 32,
    fmin: float = 0.0,
    fmax: float | None = None,
    top_db: float | None = 80.0,
    audio_offset: float = 0.0,
    mic_stride: float = 1.0,
    gate: QualityGate | None = None,
    keyframe_options: dict[str, Any] | None = None,
    start_time: float | None = None,
    progress: Callable[[float], None] | None = None,
    align: str = "shot",
    max_per_shot: int = 1,
    labels: Labels | None = None,
    max_seconds: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> IngestReport:
    """Turn a video and/or an audio stream into samples in ``store``.

    Parameters
    ----------
    video : file, camera index or stream URL (edge/sources.py); an image folder, glob or file, or an opened
        :class:`fedge.edge.images.ImageSource` (one sample per image, :mod:`fedge.edge.images`); None for a
        microphone-only device.
    audio : WAV/FLAC/OGG file or a video file's audio track, or a live source (``alsa:hw:1``,
        ``pulse:default``, ``lavfi:GRAPH``, a FIFO: :mod:`fedge.edge.live_audio`); None: the video's own track when it
        has one (and ``audio_from_video``), else a camera-only device.
    store : an open :class:`SampleStore` or its directory.
    label : class of every sample (None: unlabeled).
    sr, n_fft, hop_length, n_mels, frames, fmin, fmax, top_db : audio features (defaults: the model's input).
    audio_offset : seconds to add to a keyframe's time to find its audio (streams that do not start together).
    mic_stride : seconds between windows of a microphone-only device.
    gate : the quality gate (default thresholds if None).
    keyframe_options : passed to ``fedge.edge.keyframes.iter_keyframes`` (min_interval, max_interval, max_side, ...).
    start_time : device time (epoch seconds) of stream time 0 (default: now).
    progress : called with the stream seconds processed so far.
    align : ``"shot"``: each keyframe's audio where the sound is in its shot; ``"keyframe"``: the window
        centred on the keyframe's time (see the module docstring).
    max_per_shot : with ``align="shot"``, at most this many samples per shot (same keyframe, one per separate
        sound).
    labels : labelled time spans (:func:`fedge.edge.labels.load_labels`) instead of one ``label``; a span that ends
        after the recording sets the report's ``error`` once the stream has ended. For images, the spans of
        :meth:`fedge.edge.images.ImageSource.labels` (labels by file name).
    max_seconds : stop after this many seconds of stream (None: at its end; a live source runs until
        ``stop``).
    stop : polled between samples; True ends the run like the end of the stream (what was stored stays, the
        report counts it). A KeyboardInterrupt does the same, but may leave the last stored sample uncounted.

    Raises
    ------
    IngestError
        Neither a video nor an audio source.
    fedge.edge.sources.VideoSourceError, fedge.edge.audio_source.AudioSourceError
        A source cannot be opened (missing, not a video / not audio, zero-length, unexpected sample rate).
    StoreBudgetError
        The store's budget cannot hold one sample (raised before anything is stored).
    """
    t_wall = time.perf_counter()
    if video is None and audio is None:
        raise IngestError("nothing to ingest: give a video source, an audio source, or both")
    if frames < 1 or not 0 < mic_stride < MAX_SECONDS:  # written so that NaN fails too
        raise IngestError(f"frames must be >= 1 and mic_stride in (0, {MAX_SECONDS:g}) s, got {frames}, {mic_stride}")
    if not abs(audio_offset) < MAX_SECONDS:
        raise IngestError(f"audio_offset must be finite, within +-{MAX_SECONDS:g} s, got {audio_offset}")
    if align not in ALIGN_MODES:
        raise IngestError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    if max_per_shot < 1:
        raise IngestError(f"max_per_shot must be >= 1, got {max_per_shot}")
    if labels is not None and label is not None:
        raise IngestError("give one label for every sample or labelled spans, not both")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise IngestError(f"max_seconds must be a finite number > 0, got {max_seconds}")
    st = store if isinstance(store, SampleStore) else SampleStore(store)
    gate = gate or QualityGate()
    params = MelParams(sr=sr, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax)
    rep = IngestReport(video=None if video is None else str(video), audio=None if audio is None else str(audio))
    t0 = time.time() if start_time is None else float(start_time)

    vsrc = None
    images: ImageSource | None = None
    if video is not None:
        from fedge.edge.images import ImageSource, is_image_source, open_images

        if isinstance(video, ImageSource) or is_image_source(video):
            if audio is not None:
                raise IngestError("images have no timeline to pair audio with: ingest the audio on its own")
            images = video if isinstance(video, ImageSource) else open_images(str(video))
            rep.video = images.name
        else:
            from fedge.edge.sources import open_video

            vsrc = open_video(video)
            rep.bytes_in += _file_size(str(video))
    asrc: AudioSource | None = None
    try:
        if audio is not None:
            asrc = open_audio(audio, sr=sr, max_seconds=max_seconds)
            if str(audio) != str(video):
                rep.bytes_in += asrc.bytes_in
        elif vsrc is not None and audio_from_video and isinstance(video, (str, Path)) and os.path.isfile(video):
            try:
                asrc = open_audio(video, sr=sr, max_seconds=max_seconds)
                rep.audio = str(video)
                rep.notes.append("audio: the video's own audio track")
            except AudioSourceError as e:
                rep.notes.append(f"camera-only: {e}")
        elif vsrc is not None or images is not None:
            rep.notes.append("camera-only: no audio source given")
        if vsrc is None and images is None:
            rep.notes.append(f"microphone-only: audio windows every {mic_stride:g} s")
        has_image = vsrc is not None or images is not None
        rep.modalities = tuple(m for m, on in (("image", has_image), ("audio", asrc is not None)) if on)
        windows = AudioWindows(asrc, params, frames, top_db) if asrc is not None else None
        # a recording ingested before resumes past its last stored sample (edge/resume.py); live sources do not
        recorded = video if isinstance(video, (str, int, Path)) else None  # images have keys of their own
        key = None if images is not None else \
            source_key(recorded, audio if audio is not None and str(audio) != str(video) else None)
        resume = {"t": None if key is None else resume_point(st, key), "skipped": 0}
        if key is not None:
            track(st, key, (rep.video if vsrc is not None else rep.audio) or "")

        def store_one(image: Any, jpeg: bytes | None, win: Window | None, stream_t: float, source: str, *,
                      loudest: bool = False, image_quality: float | None = None) -> float | None:
            """Gate and store one sample; the quality of its image when this call gated and kept one.
            ``image_quality``: the image was gated already (another window of the same keyframe): attach it
            without gating it again."""
            res = gate.assess(image=image if image_quality is None else None,
                              audio=None if win is None else win[1], audio_is_loudest_of_shot=loudest)
            if resume["t"] is not None and stream_t <= resume["t"]:  # stored by an earlier run
                resume["skipped"] += 1
                return None
            if not res.accepted:
                rep.samples_rejected += 1
                return None
            keep_img = "image" in res.modalities or image_quality is not None
            keep_aud = "audio" in res.modalities and win is not None
            quality = res.quality if image_quality is None else (image_quality, res.quality[1])
            sid = st.put(image_jpeg=jpeg if keep_img else None, audio=win[0] if keep_aud and win else None,
                         label=label if labels is None else labels.label_at(stream_t), quality=quality,
                         split=split, device_time=t0 + stream_t, stream_time=stream_t, source=source)
            rep.samples_stored += 1
            rep.keyframes_kept += int(keep_img)
            rep.audio_windows += int(keep_aud)
            rep.bytes_stored += (len(jpeg) if keep_img and jpeg else 0) + (2 * win[0].size if keep_aud and win else 0)
            rep.first_id = sid if rep.first_id is None else rep.first_id
            rep.last_id = sid
            return res.quality[0] if keep_img and image_quality is None else None

        def store_shot(image: Any, jpeg: bytes | None, wins: list[Window], stream_t: float, source: str, *,
                       whole_shot: bool) -> None:
            """One sample per window, the first (the loudest) with the keyframe gated, the others sharing it.
            ``whole_shot``: the windows were chosen from the keyframe's whole shot."""
            if not wins:
                store_one(image, jpeg, None, stream_t, source)
                return
            loudest = int(np.argmax([float(np.mean(w[1] ** 2)) if w[1].size else 0.0 for w in wins]))
            order = [loudest] + [i for i in range(len(wins)) if i != loudest]
            q_img = store_one(image, jpeg, wins[loudest], stream_t, source, loudest=whole_shot)
            for i in order[1:]:
                store_one(None if q_img is None else image, None if q_img is None else jpeg, wins[i], stream_t,
                          source, image_quality=q_img)

        stopped = False

        def stopping() -> bool:
            nonlocal stopped
            stopped = stopped or (stop is not None and stop())
            return stopped

        try:
            if images is not None:
                kf_opts = {k: v for k, v in (keyframe_options or {}).items() if k in ("max_side", "jpeg_quality")}
                # each photo is a recording of its own: one stored by an earlier run is not stored again
                img_keys = [source_key(p, None) for p in images.paths]
                done = stored_keys(st, [k for k in img_keys if k is not None])
                track_many(st, [(k, str(p)) for k, p in zip(img_keys, images.paths, strict=True)
                                if k is not None and k not in done])
                stored_before = 0
                for i, path in enumerate(images.paths):
                    if stopping():
                        break
                    if img_keys[i] in done:
                        stored_before += 1
                        continue
                    kf = images.keyframe(i, **kf_opts)
                    if kf is None:
                        continue
                    rep.keyframes += 1
                    rep.bytes_in += _file_size(str(path))
                    store_one(kf.image, kf.jpeg, None, kf.time, str(path))
                    rep.frames_decoded = images.images_read
                    if progress:
                        progress(kf.time)
                if stored_before:
                    rep.notes.append(f"{stored_before} image(s) stored by an earlier run were not stored again")
                if images.skipped:  # the others are stored; the run still fails, naming what was skipped
                    gate.counts["image:unreadable"] += len(images.skipped)  # a reason, kept in the store's stats
                    rep.samples_rejected += len(images.skipped)
                    more = f" and {len(images.skipped) - 3} more" if len(images.skipped) > 3 else ""
                    rep.error = (f"skipped {len(images.skipped)} of {len(images.paths)} images that could not "
                                 f"be read: {', '.join(images.skipped[:3])}{more}")
            elif vsrc is not None:
                from fedge.edge.keyframes import iter_keyframes

                for kf in iter_keyframes(vsrc, **(keyframe_options or {})):
                    if stopping() or (max_seconds is not None and kf.time >= max_seconds):
                        break
                    rep.keyframes += 1
                    wins: list[Window] = []
                    by_shot = align == "shot" and kf.start is not None and kf.end is not None
                    if windows is not None:
                        t_from = kf.time + audio_offset
                        if by_shot:
                            assert kf.start is not None and kf.end is not None
                            # a chunk edge inside a shot may cut a word: windows centred in the span may cross it
                            half = frames // 2 * hop_length / sr
                            t0s = kf.start + audio_offset - (half if kf.open_start else 0.0)
                            t1s = kf.end + audio_offset + (half if kf.open_end else 0.0)
                            wins = windows.span(t0s, t1s, max_per_shot)
                            t_from = min(t_from, t0s)
                        else:
                            win = windows.window(kf.time + audio_offset)
                            wins = [] if win is None else [win]
                        windows.release_before(int((t_from - _KEEP_S) * sr / hop_length))
                    store_shot(kf.image, kf.jpeg, wins, kf.time, rep.video or "", whole_shot=by_shot)
                    rep.frames_decoded = vsrc.frames_read
                    if progress:
                        progress(kf.time)
                rep.frames_decoded = vsrc.frames_read
                if vsrc.error:
                    rep.notes.append(vsrc.error)
                if windows is not None and not stopped:
                    windows.drain()
            elif windows is not None:
                # stride spans longer than a window: where the sound is in each; else the window at each instant
                by_span = align == "shot" and mic_stride * sr / hop_length > frames
                for k, c in enumerate(_mic_centres(params, frames, mic_stride)):
                    if stopping():
                        break
                    if by_span:
                        wins = windows.span(k * mic_stride, (k + 1) * mic_stride, max_per_shot, clamp_end=False)
                    else:
                        win = windows.window(c, clamp_end=False)
                        wins = [] if win is None else [win]
                    if not wins:
                        if windows.done:
                            break
                        continue
                    windows.release_before(min(w[2] for w in wins))
                    for w in wins:
                        store_one(None, None, w, (w[2] + frames // 2) * hop_length / sr if by_span else c,
                                  rep.audio or "")
                    if progress:
                        progress(c)
                if not stopped:
                    windows.drain()
            if asrc is not None:
                rep.audio_seconds = asrc.seconds_out
                if asrc.error:
                    rep.notes.append(asrc.error)
                if rep.audio_seconds * sr < frames * hop_length:
                    rep.notes.append(f"audio too short for one window of {frames} frames "
                                     f"({frames * hop_length / sr:.2f} s)")
            rep.samples_resumed = resume["skipped"]
            if resume["t"] is not None:
                rep.notes.append(f"resumed after {resume['t']:.3f} s of stream (stored by an earlier run; "
                                 f"{resume['skipped']} sample(s) skipped)")
            if stopped:
                rep.notes.append("stopped on request; what was stored is kept")
            if labels is not None and images is None:  # the recording's length is known now that it has ended
                bad = labels.past_end(*_duration(vsrc, asrc, hop_length / sr))
                if bad is not None:
                    rep.error = str(bad)
        except StoreBudgetError:
            raise
        except (StoreFullError, StoreError, AudioSourceError, KeyboardInterrupt) as e:
            if isinstance(e, KeyboardInterrupt):  # Ctrl-C on a live source: its normal end
                rep.notes.append("interrupted; what was stored is kept")
            else:
                rep.error = str(e)  # stop here: what was stored stays stored
            if asrc is not None:
                rep.audio_seconds = asrc.seconds_out
            if vsrc is not None:
                rep.frames_decoded = vsrc.frames_read
    finally:
        if vsrc is not None:
            vsrc.close()
        if asrc is not None:
            asrc.close()  # a live source's ffmpeg stops here
    rep.rejected = dict(Counter(gate.counts))
    try:  # the store keeps the gate's removals for `fedge edge store stats`
        st.add_rejections(rep.rejected)
    except StoreError as e:
        rep.error = rep.error or str(e)
    rep.seconds = time.perf_counter() - t_wall
    return rep


def _duration(vsrc: Any, asrc: AudioSource | None, audio_step: float) -> tuple[float, float]:
    """(seconds, tolerance) of a recording that has ended: its longer stream, give or take one frame."""
    secs, tol = 0.0, audio_step
    if vsrc is not None and vsrc.fps > 0:
        secs, tol = vsrc.frames_read / vsrc.fps, 1.0 / vsrc.fps
    if asrc is not None:
        secs = max(secs, asrc.seconds_out)
    return secs, tol


def _mic_centres(p: MelParams, frames: int, stride_s: float) -> Iterator[float]:
    """Centre times of microphone-only windows: the first starts at frame 0, then every ``stride_s``."""
    first = (frames // 2) * p.hop / p.sr
    k = 0
    while True:
        yield first + k * stride_s
        k += 1
