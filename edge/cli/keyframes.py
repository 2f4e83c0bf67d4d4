"""``fedge edge keyframes``: shot boundaries and keyframes of one video (:func:`fedge.edge.keyframes.extract_keyframes`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from fedge.common.media.shots import Boundary
from fedge.edge.keyframes import extract_keyframes
from fedge.edge.sources import VideoSourceError, open_video

__all__ = ["keyframes_command"]


def keyframes_command(
    video: Annotated[str, typer.Argument(help="Video file, camera index (0) or stream URL (rtsp://, http://).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    min_interval: Annotated[float, typer.Option(help="Seconds: no two keyframes closer than this.")] = 0.25,
    max_interval: Annotated[float, typer.Option(
        help="Seconds: a long shot gets a keyframe at least this often.")] = 4.0,
    stride: Annotated[int, typer.Option(
        help="Analyse every n-th frame (0: about 10 analysed frames per second).")] = 0,
    max_side: Annotated[int, typer.Option(help="Longer side of keyframe images in pixels.")] = 320,
    out: Annotated[Path | None, typer.Option(help="Also write keyframe JPEGs into this directory.")] = None,
) -> None:
    """Detect shot boundaries and extract keyframes from VIDEO (``--json``: one JSON object)."""
    if out is not None:  # before any decoding: a folder that cannot be written wastes no work
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            typer.echo(f"error: cannot create --out folder {out}: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
    try:
        video_src = open_video(video, decode_threads=1)  # decoded in extract_keyframes' reader thread
    except VideoSourceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    total = video_src.frame_count
    with tqdm(total=total, unit="frame", disable=None, file=sys.stderr, leave=False) as bar:
        last = [0]

        def tick(_: Boundary | None = None) -> None:
            bar.update(video_src.frames_read - last[0])
            last[0] = video_src.frames_read

        try:
            report = extract_keyframes(video_src, min_interval=min_interval, max_interval=max_interval,
                                       stride=stride or None, max_side=max_side, on_boundary=tick)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        finally:
            video_src.close()
        tick()
    if report.frames == 0:
        typer.echo(f"error: no frame could be decoded from {video}", err=True)
        raise typer.Exit(1)
    if out is not None:
        try:
            for k in report.keyframes:
                (out / f"frame{k.frame:08d}.jpg").write_bytes(k.jpeg)
        except OSError as e:
            typer.echo(f"error: cannot write keyframes into {out}: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        typer.echo(f"{report.video}: {report.frames} frames at {report.fps:g} fps in {report.seconds:.2f} s; "
                   f"{len(report.boundaries)} shot boundaries, {len(report.keyframes)} keyframes")
        typer.echo("boundaries: " + " ".join(map(str, report.boundaries)))
        for k in report.keyframes:
            typer.echo(f"  keyframe frame {k.frame:6d}  t={k.time:8.3f}s  score={k.score:.3f}")
    if report.error:
        typer.echo(f"warning: {report.error}", err=True)
