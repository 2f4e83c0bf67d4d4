"""Keyframe extraction over real video files (cv2.VideoWriter), video sources and the CLI, bad input included."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data as skdata
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.common.media.scenes import Shot, match, render
from fedge.edge.keyframes import (
    READ_AHEAD_BYTES,
    Keyframe,
    default_read_ahead,
    default_stride,
    extract_keyframes,
    iter_keyframes,
)
from fedge.edge.sources import VideoSourceError, open_video, parse_source

SIZE = (160, 120)
FPS = 30.0


def _bgr(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, 2::-1]) if x.ndim == 3 else np.dstack([x] * 3)


PHOTOS = [_bgr(getattr(skdata, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]


def _write(path: Path, frames: list[np.ndarray], fourcc: str = "mp4v") -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    assert w.isOpened()
    for f in frames:
        w.write(f)
    w.release()
    return path


def _truncated_avi(tmp_path: Path, frames: list[np.ndarray], keep: float) -> Path:
    """An MJPG AVI of ``frames`` cut after the fraction ``keep`` of its bytes."""
    data = _write(tmp_path / "good.avi", frames, "MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Six shots: a cut, a dissolve, a fade through black, a cut into a short shot and one out of it."""
    shots = [Shot(PHOTOS[0], 45, noise=3), Shot(PHOTOS[1], 50, pan=(1.0, 0), zoom=1.5),
             Shot(PHOTOS[2], 50, flashes=(20,)), Shot(PHOTOS[3], 50), Shot(PHOTOS[4], 8),
             Shot(PHOTOS[0], 40, zoom_rate=0.005, zoom=1.3)]
    frames, truth = render(shots, [("cut", 0), ("dissolve", 15), ("fade", 16), ("cut", 0), ("cut", 0)], SIZE,
                           seed=1)
    path = _write(tmp_path_factory.mktemp("kf") / "edit.mp4", frames)
    return path, frames, truth


def test_boundaries_match_the_edit(edited):
    path, frames, truth = edited
    report = extract_keyframes(path)
    assert report.frames == len(frames)
    assert report.fps == pytest.approx(FPS)
    assert report.error is None
    tp, fp, fn = match(truth, report.boundaries, tol=2)
    assert (tp, fp, fn) == (len(truth), 0, 0), (truth, report.boundaries)


def test_one_keyframe_per_shot_with_image_jpeg_and_score(edited):
    path, frames, truth = edited
    report = extract_keyframes(path, max_side=96)
    starts = [0] + report.boundaries + [len(frames)]
    for a, b in zip(starts, starts[1:]):
        assert any(a <= k.frame < b for k in report.keyframes), f"no keyframe in shot {a}..{b}"
    for k in report.keyframes:
        assert isinstance(k, Keyframe)
        assert k.time == pytest.approx(k.frame / FPS)
        assert 0.0 <= k.score <= 1.0
        assert k.image.dtype == np.uint8 and k.image.ndim == 3 and max(k.image.shape[:2]) <= 96
        decoded = cv2.imdecode(np.frombuffer(k.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == k.image.shape
        # RGB image vs the BGR frame it came from (resized): same content, channel order swapped
        src = cv2.resize(frames[k.frame], (k.image.shape[1], k.image.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.abs(src[:, :, ::-1].astype(int) - k.image.astype(int)).mean() < 12
    assert [k.frame for k in report.keyframes] == sorted(k.frame for k in report.keyframes)


def test_long_shot_gets_periodic_keyframes_and_min_interval_holds(tmp_path):
    frames, _ = render([Shot(PHOTOS[1], 240, pan=(0.8, 0.2), zoom=2.0, noise=2)], [], SIZE)
    path = _write(tmp_path / "long.mp4", frames)
    report = extract_keyframes(path, max_interval=1.0, min_interval=0.5)
    times = [k.time for k in report.keyframes]
    assert report.boundaries == []
    assert len(times) >= 7  # 8 s of video, one keyframe per second at least
    gaps = np.diff([0.0] + times + [len(frames) / FPS])
    assert gaps.max() <= 2.0 + 1e-6  # never two chunks without a keyframe
    assert np.diff(times).min() >= 0.5 - 1e-6


def test_min_interval_drops_keyframes_of_shots_too_close_together(tmp_path):
    shots = [Shot(PHOTOS[i % 5], 12) for i in range(6)]
    frames, truth = render(shots, [("cut", 0)] * 5, SIZE)
    path = _write(tmp_path / "quick.mp4", frames)
    dense = extract_keyframes(path, min_interval=0.0)
    sparse = extract_keyframes(path, min_interval=1.0)
    assert len(dense.keyframes) == len(shots)
    assert len(sparse.keyframes) < len(dense.keyframes)
    assert np.diff([k.time for k in sparse.keyframes]).min() >= 1.0 - 1e-6


def test_keyframes_stream_before_the_video_ends(tmp_path):
    frames, _ = render([Shot(PHOTOS[2], 150), Shot(PHOTOS[3], 210)], [("cut", 0)], SIZE)
    path = _write(tmp_path / "stream.mp4", frames)
    video = open_video(path)
    it = iter_keyframes(video, max_interval=1.0)
    next(it)
    assert video.frames_read < len(frames)  # the first keyframe came out while decoding
    rest = list(it)
    assert rest and video.frames_read == len(frames)
    video.close()


def test_bad_options_are_refused(edited):
    path, _, _ = edited
    with pytest.raises(ValueError):
        extract_keyframes(path, min_interval=2.0, max_interval=1.0)
    with pytest.raises(ValueError):
        extract_keyframes(path, max_side=2)
    with pytest.raises(ValueError):
        extract_keyframes(path, read_ahead=-1)


# ---------------------------------------------------------------------------------------------- sources
def test_source_decodes_every_frame_but_converts_only_those_asked_for(edited):
    path, frames, _ = edited
    video = open_video(path)
    got = list(video.frames(every=3))
    assert [i for i, _, _ in got] == list(range(0, len(frames), 3))
    assert video.frames_read == len(frames) and video.frame_count == len(frames)
    assert got[1][1] == pytest.approx(3 / FPS)
    assert got[0][2].shape == (SIZE[1], SIZE[0], 3)
    assert default_stride(FPS) == 3 and default_stride(10) == 1


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedge-video-reader")]


def test_read_ahead_yields_what_frames_yields_with_prepare_run_in_the_reader(edited):
    path, frames, _ = edited
    with open_video(path) as v0:
        plain = list(v0.frames(every=3))
    where: set[str] = set()

    def prepare(f: np.ndarray) -> tuple[int, ...]:
        where.add(threading.current_thread().name)
        return f.shape

    with open_video(path) as v1:
        ahead = list(v1.read_ahead(every=3, depth=2, prepare=prepare))
        assert v1.frames_read == len(frames) and v1.error is None
    assert [a[0] for a in ahead] == [p[0] for p in plain]
    assert all(np.array_equal(a[2], p[2]) and a[3] == p[2].shape for a, p in zip(ahead, plain))
    assert len(where) == 1 and next(iter(where)).startswith("fedge-video-reader")
    assert not _readers()


def test_one_decoder_thread_decodes_the_same_frames(edited):
    path, frames, _ = edited
    with open_video(path) as v_default, open_video(path, decode_threads=1) as v_one:
        a, b = list(v_default.frames(every=5)), list(v_one.frames(every=5))
    assert len(a) == len(b) == len(range(0, len(frames), 5))
    assert all(x[0] == y[0] and np.array_equal(x[2], y[2]) for x, y in zip(a, b))


def test_read_ahead_is_bounded_and_stops_its_thread_on_early_exit_and_on_close(edited):
    path, frames, _ = edited
    video = open_video(path)
    it = video.read_ahead(every=1, depth=2)
    assert [next(it)[0], next(it)[0]] == [0, 1]
    assert len(_readers()) == 1
    time.sleep(0.2)
    assert video.frames_read <= 2 + 2 + 1  # taken + queued + one in the reader's hands: memory stays bounded
    it.close()  # the consumer stops early
    assert not _readers()
    it2 = video.read_ahead(every=1, depth=2)  # the source goes on from where it was
    first = next(it2)[0]
    assert 2 <= first < len(frames)
    video.close()  # closing the source stops a reader that is still running
    assert not _readers()
    assert len(list(it2)) <= 2  # what was already queued, then the end


def test_read_ahead_reraises_a_reader_error_after_the_frames_before_it(edited):
    path, _, _ = edited
    calls = [0]

    def prepare(f: np.ndarray) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom in the reader")

    got = []
    with open_video(path) as video, pytest.raises(RuntimeError, match="boom in the reader"):
        for item in video.read_ahead(every=1, depth=4, prepare=prepare):
            got.append(item[0])
    assert got == [0, 1]
    assert not _readers()


def test_an_error_in_the_consumer_stops_the_reader(edited):
    path, _, _ = edited

    def fail(_b: object) -> None:
        raise KeyError("consumer failed")

    with open_video(path) as video, pytest.raises(KeyError):
        list(iter_keyframes(video, on_boundary=fail))
    assert not _readers()


def test_parse_source_accepts_camera_indices_and_urls(tmp_path):
    assert parse_source(0) == 0 and parse_source("2") == 2
    assert parse_source("rtsp://127.0.0.1:8554/cam") == "rtsp://127.0.0.1:8554/cam"
    with pytest.raises(VideoSourceError, match="not found"):
        parse_source(tmp_path / "nope.mp4")
    with pytest.raises(VideoSourceError, match="directory"):
        parse_source(tmp_path)


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(VideoSourceError, match="video not found") as e:
        extract_keyframes(tmp_path / "missing.mp4")
    assert "\n" not in str(e.value)


def test_a_text_file_is_not_a_video(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("these are not frames\n" * 50)
    with pytest.raises(VideoSourceError, match="not a video") as e:
        open_video(p)
    assert "\n" not in str(e.value)


def test_truncated_avi_keeps_what_decoded_and_says_where_it_broke(tmp_path, edited):
    _, frames, _ = edited
    cut = _truncated_avi(tmp_path, frames, 1 / 2)
    report = extract_keyframes(cut)
    assert 0 < report.frames < len(frames)
    assert report.error is not None and f"broke at frame {report.frames}" in report.error
    assert "\n" not in report.error
    assert report.keyframes  # what decoded was used


@pytest.mark.parametrize("size", [(160, 120), (640, 360), (1280, 720), (1920, 1080), (3840, 2160), (0, 0)])
def test_read_ahead_depth_is_bounded_by_memory(size):
    depth = default_read_ahead(*size)
    assert 4 <= depth <= 32
    frame_bytes = size[0] * size[1] * 3
    assert depth == 4 or depth * frame_bytes <= READ_AHEAD_BYTES  # never more than the budget beyond 4 frames
    if frame_bytes and 4 * frame_bytes < READ_AHEAD_BYTES // 2:
        assert depth > 4  # small frames: deep enough to ride out the detector's bursts


def test_deep_and_shallow_read_ahead_and_inline_decoding_agree(edited):
    path, _, _ = edited
    reports = [extract_keyframes(path, read_ahead=r) for r in (None, 1, 0)]
    assert len({tuple(r.boundaries) for r in reports}) == 1
    assert len({tuple(k.frame for k in r.keyframes) for r in reports}) == 1
    assert not _readers()


def test_truncated_video_reports_the_same_with_and_without_the_reader_thread(tmp_path, edited):
    _, frames, _ = edited
    cut = _truncated_avi(tmp_path, frames, 2 / 3)
    threaded, inline = extract_keyframes(cut), extract_keyframes(cut, read_ahead=0)
    assert 0 < threaded.frames < len(frames) and threaded.error is not None
    assert (threaded.frames, threaded.error, threaded.boundaries) == (inline.frames, inline.error, inline.boundaries)
    assert [k.frame for k in threaded.keyframes] == [k.frame for k in inline.keyframes]
    assert not _readers()


def test_corrupt_mp4_keeps_what_decoded(tmp_path, edited):
    _, frames, _ = edited
    good = _write(tmp_path / "good.mp4", frames)
    data = bytearray(good.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4000] = bytes(4000)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    report = extract_keyframes(bad)
    assert 0 < report.frames < len(frames)
    assert report.error is not None and "broke at frame" in report.error


def test_mp4_cut_before_its_index_cannot_be_opened(tmp_path, edited):
    _, frames, _ = edited
    good = _write(tmp_path / "good.mp4", frames)
    bad = tmp_path / "headless.mp4"
    bad.write_bytes(good.read_bytes()[:4000])  # OpenCV's mp4 writer puts the index (moov) at the end
    with pytest.raises(VideoSourceError, match="cannot open"):
        open_video(bad)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_prints_exactly_one_json_object(edited):
    path, frames, truth = edited
    res = CliRunner().invoke(build_app(), ["edge", "keyframes", str(path), "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert set(obj) == {"video", "fps", "frames", "seconds", "boundaries", "keyframes"}
    assert obj["frames"] == len(frames) and obj["fps"] == pytest.approx(FPS) and obj["seconds"] > 0
    assert match(truth, obj["boundaries"])[1:] == (0, 0)
    assert all(set(k) == {"frame", "time", "score"} for k in obj["keyframes"])


def test_cli_writes_jpegs_and_a_summary(edited, tmp_path):
    path, _, _ = edited
    res = CliRunner().invoke(build_app(), ["edge", "keyframes", str(path), "--out", str(tmp_path / "kf")])
    assert res.exit_code == 0, res.output
    assert "keyframes" in res.stdout
    jpgs = sorted((tmp_path / "kf").glob("*.jpg"))
    assert jpgs and cv2.imread(str(jpgs[0])) is not None


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_cli_bad_input_exits_non_zero_with_one_line(kind, tmp_path):
    p = tmp_path / "x.mp4"
    if kind == "text":
        p.write_text("hello\n" * 100)
    res = CliRunner().invoke(build_app(), ["edge", "keyframes", str(p), "--json"])
    assert res.exit_code != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_cli_truncated_video_reports_the_break(tmp_path, edited):
    _, frames, _ = edited
    cut = _truncated_avi(tmp_path, frames, 1 / 3)
    res = CliRunner().invoke(build_app(), ["edge", "keyframes", str(cut), "--json"])
    assert res.exit_code == 0
    obj = json.loads(res.stdout)
    assert 0 < obj["frames"] < len(frames) and "broke at frame" in obj["error"]
    assert "warning:" in res.stderr
