"""``fedge edge ingest``: a camera and/or microphone stream into a SampleStore (:func:`fedge.edge.ingest.ingest`)."""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedge.edge.audio_source import AudioSourceError
from fedge.edge.ingest import IngestError, ingest
from fedge.edge.labels import Labels
from fedge.edge.store import SampleStore, StoreError, budget_from_mb

if TYPE_CHECKING:
    from fedge.edge.images import ImageSource

__all__ = ["checked_labels", "ingest_command"]


def checked_labels(label: int | None, labels_file: Path | None, *, config: Path | None,
                    overrides: list[str], images: ImageSource | None = None) -> Labels | None:
    """The labelled spans of ``--labels`` (or None), with ``--label`` and every span's label checked against
    the config's ``model.num_classes``. For ``images``, ``--labels`` names files (:mod:`fedge.edge.images`).

    Raises
    ------
    ValueError
        One line: both options given, a bad config, a bad labels file (:class:`fedge.edge.labels.LabelsError`), or a
        label outside ``model.num_classes``.
    """
    from fedge.common.config import ConfigError, load_config, parse_overrides
    from fedge.edge.labels import load_labels

    if label is not None and labels_file is not None:
        raise ValueError("give --label or --labels, not both")
    try:
        n = load_config(toml_path=config, overrides=parse_overrides(overrides)).model.num_classes
    except (ConfigError, FileNotFoundError) as e:
        raise ValueError(str(e)) from None
    if label is not None and not 0 <= label < n:
        raise ValueError(f"--label {label} is outside model.num_classes = {n} (0..{n - 1})")
    if labels_file is not None and images is not None:
        from fedge.edge.images import read_name_labels

        by_name = images.labels(read_name_labels(labels_file), str(labels_file))
        by_name.check_classes(n)
        return by_name
    return None if labels_file is None else load_labels(labels_file, num_classes=n)


def ingest_command(
    *,
    video: Annotated[str | None, typer.Option(
        "--video", help="Video file, camera index (0) or stream URL; or images: a folder, a quoted glob "
                        "('photos/*.jpg') or one image file (one sample each).")] = None,
    audio: Annotated[str | None, typer.Option(
        "--audio", help="WAV/FLAC/OGG file or a video file (its audio track), or a live microphone: alsa:hw:1 (or "
                        "hw:1), pulse:default, a FIFO, lavfi:GRAPH (ffmpeg). Default: the video's own track when "
                        "it has one.")] = None,
    store: Annotated[Path, typer.Option("--store", help="SampleStore directory (created if missing).")],
    label: Annotated[int | None, typer.Option(
        "--label", help="Class index of every sample (default: unlabeled).")] = None,
    labels_file: Annotated[Path | None, typer.Option(
        "--labels", help="Labelled time spans instead of --label: a CSV (start_s,end_s,label; header optional) or "
                         "a JSON list of {start_s, end_s, label}. A sample takes the label of the span its keyframe "
                         "(or a microphone-only window's centre) falls in; outside every span it is unlabeled. For "
                         "images: labels by file name, a CSV (filename,label) or a JSON object {name: label}.")] = None,
    budget_mb: Annotated[float | None, typer.Option(
        "--budget-mb", help="Byte budget of the store in MB (oldest samples are evicted).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "train",
    no_video_audio: Annotated[bool, typer.Option(
        "--no-video-audio", help="Ignore the video's own audio track (camera-only).")] = False,
    mic_stride: Annotated[float, typer.Option(
        "--mic-stride", help="Seconds between windows of a microphone-only device.")] = 1.0,
    audio_offset: Annotated[float, typer.Option("--audio-offset", help="Seconds from video time to audio time.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    align: Annotated[str, typer.Option(
        "--align", help="Where a keyframe's audio comes from: 'shot' (where the sound is in the keyframe's shot) "
                        "or 'keyframe' (the window centred on the keyframe).")] = "shot",
    max_per_shot: Annotated[int, typer.Option(
        "--max-per-shot", help="With --align shot: up to this many samples per shot, one per separate sound (same "
                               "keyframe).")] = 1,
    min_interval: Annotated[float, typer.Option(
        "--min-interval", help="Seconds: no two keyframes closer than this.")] = 0.25,
    max_interval: Annotated[float, typer.Option(
        "--max-interval", help="Seconds: a long shot (or a camera without cuts) gets a keyframe at least this "
                               "often.")] = 4.0,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="Stop after this many seconds of stream (a live source otherwise runs until Ctrl-C or "
                           "SIGTERM, which end it cleanly).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Run config TOML: model.num_classes bounds --label and --labels.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override KEY=VALUE, repeatable (e.g. model.num_classes=5).")] = None,
) -> None:
    """Ingest a camera and/or microphone stream into a SampleStore: keyframes + aligned log-mel windows,
    quality-gated. Prints a summary (frames decoded, keyframes kept, seconds of audio, samples stored, rejected
    by reason, raw bytes in vs bytes stored)."""
    import json

    from tqdm import tqdm

    from fedge.edge.sources import VideoSourceError

    def fail(msg: str, code: int = 1) -> None:
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(code)

    from fedge.edge.images import ImageSource, is_image_source, open_images

    for name, v in (("--min-interval", min_interval), ("--max-interval", max_interval), ("--duration", duration)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            fail(f"{name} must be a finite number of seconds >= 0, got {v}", 2)
    if max_interval < min_interval or max_interval == 0:
        fail(f"--max-interval ({max_interval:g}) must be > 0 and >= --min-interval ({min_interval:g})", 2)
    if duration == 0:
        fail("--duration must be > 0", 2)
    source: str | ImageSource | None = video
    spans = None
    try:  # images are listed and labels checked before anything is opened or stored
        if video is not None and is_image_source(video):
            source = open_images(video)
        spans = checked_labels(label, labels_file, config=config, overrides=set_ or [],
                                images=source if isinstance(source, ImageSource) else None)
    except VideoSourceError as e:
        fail(str(e), 1)
    except ValueError as e:
        fail(str(e), 2)
    try:
        st = SampleStore(store, budget_bytes=budget_from_mb(budget_mb))
        evicted0 = st.stats()["evicted"]
    except StoreError as e:
        fail(str(e), 2)
    bar = tqdm(unit="s", desc="ingest", disable=None, file=sys.stderr, leave=False,
               bar_format="{desc}: {n:.1f} s of stream [{elapsed}, {rate_fmt}]")
    last = [0.0]

    def progress(t: float) -> None:
        if t > last[0]:
            bar.update(t - last[0])
            last[0] = t

    # SIGTERM or Ctrl-C ends a live source after its current sample: the report is printed, the store kept;
    # a second one interrupts at once (e.g. a FIFO still waiting for its writer)
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    try:
        rep = ingest(video=source, audio=audio, store=st, label=label, split=split,
                     audio_from_video=not no_video_audio, mic_stride=mic_stride, audio_offset=audio_offset,
                     progress=progress, align=align, max_per_shot=max_per_shot, labels=spans,
                     keyframe_options={"min_interval": min_interval, "max_interval": max_interval},
                     max_seconds=duration, stop=stop_requested.is_set)
        evicted = st.stats()["evicted"] - evicted0
        if evicted:
            rep.notes.append(f"evicted the {evicted} oldest sample(s) to stay within the store budget of "
                             f"{st.budget_bytes} bytes")
    except (IngestError, VideoSourceError, AudioSourceError, StoreError, ValueError) as e:
        bar.close()
        fail(str(e), 2 if isinstance(e, (IngestError, ValueError)) else 1)
    except KeyboardInterrupt:  # before the streams were open (e.g. a FIFO waiting for its writer)
        bar.close()
        fail("interrupted before any stream was read; nothing stored", 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        st.close()
    bar.close()
    typer.echo(json.dumps(rep.to_json()) if as_json else rep.summary())
    if rep.error:
        typer.echo(f"error: {rep.error}", err=True)
    if rep.samples_stored == 0 and rep.samples_resumed == 0:  # a finished recording run again stores nothing
        typer.echo("error: no sample was stored", err=True)
        raise typer.Exit(1)
    if rep.error:
        raise typer.Exit(1)
