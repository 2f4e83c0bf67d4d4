"""Shot-level audio alignment (edge/align.py and its use in edge/ingest.py): the audio of a shot's sample is taken
where the sound is, wherever the keyframe lies; silent shots lose their audio; several sounds, several samples."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import soundfile as sf

from fedge.common.media.audio import mel_power, power_to_db
from fedge.common.media.mel import BLOCK, MelParams
from fedge.edge.align import NoiseFloor, active_segments, choose_windows, frame_energy_db, window_power
from fedge.edge.audio_windows import AudioWindows
from fedge.edge.ingest import ingest
from fedge.edge.labels import parse_labels
from fedge.edge.store import SampleStore

SR, HOP, FRAMES, SHOT_S = 16000, 256, 32, 2.0
WORD_S = 0.35


def _word(rng: np.random.Generator, f0: float = 140.0) -> np.ndarray:
    """A voiced 'word': harmonics of ``f0`` under a syllable envelope, peak about -14 dBFS."""
    t = np.arange(int(WORD_S * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    env = np.sin(np.pi * t / WORD_S) ** 0.5 * (0.7 + 0.3 * np.sin(2 * np.pi * 4 * t))
    return (0.1 * env * x).astype(np.float32)


def _track(words: list[list[float]], *, noise_rms: float, seed: int = 0, silent_shots: tuple[int, ...] = ()
           ) -> np.ndarray:
    """One shot per entry of ``words``: the word onsets (seconds into the shot) over white noise."""
    rng = np.random.default_rng(seed)
    y = rng.normal(0, noise_rms, int(SR * SHOT_S * len(words))).astype(np.float32)
    for i, onsets in enumerate(words):
        for o in onsets:
            a = int((i * SHOT_S + o) * SR)
            w = _word(rng)
            y[a : a + len(w)] += w
    for i in silent_shots:
        y[int(i * SHOT_S * SR) : int((i + 1) * SHOT_S * SR)] = 0.0
    return y


def _locate(stored_db: np.ndarray, full_mel: np.ndarray) -> int:
    """Start frame of the offline window a stored (float16) dB window equals."""
    errs = [np.abs(power_to_db(full_mel[:, k : k + FRAMES], top_db=80.0) - stored_db).max()
            for k in range(full_mel.shape[1] - FRAMES + 1)]
    k = int(np.argmin(errs))
    assert errs[k] < 0.1, "the stored window is no window of the recording"
    return k


def _holds_word(k: int, onset_s: float) -> bool:
    """The window starting at frame ``k`` covers at least 80% of the word starting at ``onset_s``."""
    w0, w1 = k * HOP / SR, (k + FRAMES) * HOP / SR
    return min(w1, onset_s + WORD_S) - max(w0, onset_s) >= 0.8 * WORD_S


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """Three 2 s shots (25 fps), each a photo under a slow, smooth pan with sensor noise: cuts at 2 s and 4 s."""
    p = tmp_path_factory.mktemp("align") / "shots.avi"
    fps, w, h = 25, 160, 120
    vw = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    rng = np.random.default_rng(0)
    for photo in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
        base = cv2.resize(photo, (w + 40, h + 40))[:, :, ::-1].astype(np.float32)
        n = int(fps * SHOT_S)
        for i in range(n):
            x = 20 * i // n
            vw.write(np.clip(base[x : x + h, x : x + w] + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8))
    vw.release()
    return p


# ----------------------------------------------------------------------------------------- pure functions
def test_window_power_is_the_mean_power_of_each_window():
    e = np.array([0.0, 10.0, 0.0, -10.0], np.float32)
    ref = [10 * np.log10(np.mean(10 ** (e[k : k + 2] / 10))) for k in range(3)]
    np.testing.assert_allclose(window_power(e, 2), ref, rtol=1e-6)


def test_noise_floor_follows_the_background_not_the_sounds():
    rng = np.random.default_rng(0)
    for level in (-70.0, -30.0):  # a quiet room and a loud street set their own floors
        e = level + rng.normal(0, 0.5, 2000)
        e[::5] += 20.0  # a fifth of the frames hold sound
        nf = NoiseFloor(history=1000)
        nf.push(e[:700])
        nf.push(e[700:])
        assert len(nf) == 1000
        assert level + 1.5 < nf.threshold() < level + 8.0


def test_active_segments_bridge_short_pauses_and_drop_clicks():
    e = np.zeros(60)
    e[5:15] = e[18:25] = 10.0  # one sound with a 3-frame pause
    e[40] = 10.0  # a click
    e[45:55] = 10.0
    assert active_segments(e, 5.0, min_gap=4, min_len=3) == [(5, 25), (45, 55)]


def test_choose_windows_takes_the_loudest_then_one_per_separate_sound():
    e = np.full(200, -40.0, np.float32)
    e[20:40] = -10.0  # the louder sound
    e[150:170] = -20.0
    assert choose_windows(e, frames=32, threshold=-35.0, max_windows=1) == [int(np.argmax(window_power(e, 32)))]
    two = choose_windows(e, frames=32, threshold=-35.0, max_windows=2)
    assert len(two) == 2 and two[0] <= 20 and two[0] + 32 >= 40 and two[1] <= 150 and two[1] + 32 >= 170
    assert choose_windows(e[:20], frames=32, threshold=-35.0) == [0]  # a span shorter than a window
    quiet = np.full(200, -40.0, np.float32)
    assert len(choose_windows(quiet, frames=32, threshold=-35.0, max_windows=3)) == 1  # nothing above the floor
    e2 = e.copy()
    e2[150:170] = -40.0
    e2[60:62] = -5.0  # a click is no second sound
    assert len(choose_windows(e2, frames=32, threshold=-35.0, max_windows=2)) == 1


def test_audio_windows_read_only_as_far_as_a_span_needs():
    """Streaming: choosing a span's windows reads the audio up to the span's end, not the recording's."""

    class Chunks:
        read = 0

        def chunks(self):
            for _ in range(600):  # 60 s in 0.1 s chunks
                self.read += 1
                yield np.zeros(SR // 10, np.float32)

    src = Chunks()
    aw = AudioWindows(src, MelParams(), FRAMES, 80.0)  # type: ignore[arg-type]
    assert len(aw.span(1.0, 3.0, 2)) == 1
    assert src.read <= 30 + 10 * BLOCK * HOP / SR + 1  # 3 s and the log-mel's streaming granularity (a block)
    aw.release_before(aw._frame(2.0))
    assert aw.base == aw._frame(2.0) and aw.raw_base >= 2.0 * SR - HOP  # what lies before is released


# ----------------------------------------------------------------------------------------- ingest
@pytest.mark.parametrize("noise_rms", [1e-4, 0.01])  # quiet, and about 10 dB SNR over the word
def test_a_word_at_the_start_middle_or_end_of_its_shot_keeps_its_audio(tmp_path, video, noise_rms):
    onsets = [0.12, 0.85, SHOT_S - WORD_S - 0.12]  # one word per shot: start, middle, end
    y = _track([[o] for o in onsets], noise_rms=noise_rms)
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    full = mel_power(y, MelParams())
    st = SampleStore(tmp_path / "s")
    rep = ingest(video=video, audio=tmp_path / "a.wav", store=st)
    assert rep.error is None and rep.audio_windows == rep.samples_stored
    by_shot: dict[int, list[bool]] = {}
    for s in st.iter_samples():
        shot = int(s.stream_time // SHOT_S)
        k = _locate(s.audio, full)
        assert shot * SHOT_S <= k * HOP / SR and (k + FRAMES) * HOP / SR <= (shot + 1) * SHOT_S + 0.1
        by_shot.setdefault(shot, []).append(_holds_word(k, shot * SHOT_S + onsets[shot]))
    assert sorted(by_shot) == [0, 1, 2] and all(any(v) for v in by_shot.values())


def test_a_shot_without_sound_loses_its_audio_and_the_reason_says_the_whole_shot(tmp_path, video):
    y = _track([[0.3], [0.5], [1.0]], noise_rms=1e-4, silent_shots=(1,))
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    st = SampleStore(tmp_path / "s")
    rep = ingest(video=video, audio=tmp_path / "a.wav", store=st)
    assert rep.rejected.get("audio:silent-shot", 0) >= 1 and "audio:silent" not in rep.rejected
    for s in st.iter_samples():
        assert (s.audio is None) == (int(s.stream_time // SHOT_S) == 1)
    rep_kf = ingest(video=video, audio=tmp_path / "a.wav", store=tmp_path / "k", align="keyframe")
    assert "audio:silent-shot" not in rep_kf.rejected  # a keyframe's window says nothing about its shot


def test_two_words_in_a_shot_give_two_samples_with_max_per_shot_2_each_labelled(tmp_path, video):
    onsets = [[0.15, 1.4], [0.8], [0.2, 1.5]]
    y = _track(onsets, noise_rms=0.003)
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    full = mel_power(y, MelParams())
    # a span boundary inside shot 0 (1.0 s): its keyframe's time decides; shot 2 lies outside every span
    labels = parse_labels("start_s,end_s,label\n0,1.0,3\n1.0,4.0,7\n", name="spans.csv", num_classes=10)
    st = SampleStore(tmp_path / "s")
    rep = ingest(video=video, audio=tmp_path / "a.wav", store=st, max_per_shot=2, labels=labels)
    assert rep.error is None
    got: dict[int, list[int]] = {}
    for s in st.iter_samples():
        shot = int(s.stream_time // SHOT_S)
        assert s.modalities == ("image", "audio")
        assert s.label == labels.label_at(s.stream_time)
        assert s.label == (None if shot == 2 else 7 if shot == 1 or s.stream_time >= 1.0 else 3)
        k = _locate(s.audio, full)
        got.setdefault(shot, []).append(next(i for i, o in enumerate(onsets[shot])
                                             if _holds_word(k, shot * SHOT_S + o)))
    assert {k: sorted(v) for k, v in got.items()} == {0: [0, 1], 1: [0], 2: [0, 1]}
    one = ingest(video=video, audio=tmp_path / "a.wav", store=tmp_path / "one")
    assert one.samples_stored == 3  # the default: one sample per shot


def test_microphone_only_spans_longer_than_a_window_take_the_loudest_window(tmp_path):
    onsets = [[1.3], [0.2]]
    y = _track(onsets, noise_rms=0.003)
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    st = SampleStore(tmp_path / "s")
    ingest(audio=tmp_path / "a.wav", store=st, mic_stride=SHOT_S)
    full = mel_power(y, MelParams())
    starts = [_locate(s.audio, full) for s in st.iter_samples()]
    assert _holds_word(starts[0], 1.3) and _holds_word(starts[1], SHOT_S + 0.2)
    for s, k in zip(st.iter_samples(), starts, strict=True):  # the sample's time is its window's centre
        assert s.stream_time == pytest.approx((k + FRAMES // 2) * HOP / SR)


def test_frame_energy_db_is_the_broadband_level():
    mel = np.full((40, 3), 1e-3 / 40)
    np.testing.assert_allclose(frame_energy_db(mel), [-30.0] * 3, atol=1e-4)


def test_cli_max_per_shot_and_bad_alignment_options(tmp_path, video):
    from typer.testing import CliRunner

    from fedge.common.cli import build_app

    y = _track([[0.15, 1.4], [0.8], [0.2, 1.5]], noise_rms=0.003)
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    base = ["edge", "ingest", "--video", str(video), "--audio", str(tmp_path / "a.wav")]
    r = CliRunner().invoke(build_app(), [*base, "--store", str(tmp_path / "s"), "--max-per-shot", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert len(SampleStore(tmp_path / "s")) == 5
    for bad, expect in ((["--align", "middle"], "align must be one of shot, keyframe"),
                        (["--max-per-shot", "0"], "max_per_shot must be >= 1")):
        r = CliRunner().invoke(build_app(), [*base, "--store", str(tmp_path / "b"), *bad])
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errs) == 1 and expect in errs[0], r.stderr


@pytest.mark.parametrize("max_interval", [4.0, 0.8])  # shots, and chunks of a long shot
def test_keyframe_spans_tile_the_video_and_hold_their_keyframe(video, max_interval):
    from fedge.edge.keyframes import extract_keyframes

    rep = extract_keyframes(str(video), max_interval=max_interval, min_interval=0.25)
    spans = [(k.start, k.end) for k in rep.keyframes]
    step = 0.08  # analysed every other frame at 25 fps
    # at most a shot's last min_interval (no keyframe that close to the previous one) belongs to no span
    assert spans[0][0] == 0.0 and 3 * SHOT_S - 0.25 - step <= spans[-1][1] <= 3 * SHOT_S + step
    for k, (a, b), nxt in zip(rep.keyframes, spans, [*spans[1:], None], strict=True):
        assert a <= k.time < b and b - a <= 2 * max_interval + step
        assert nxt is None or 0 <= nxt[0] - b <= 0.25 + step
    if max_interval == 4.0:
        assert [round(a, 1) for a, _ in spans] == [0.0, 2.0, 4.0]  # the cuts
        assert all(nxt[0] == b for (_, b), nxt in itertools.pairwise(spans))


def test_a_span_ending_with_the_video_is_fine_one_past_it_is_the_runs_error(tmp_path, video):
    ok = ingest(video=video, store=tmp_path / "a", labels=parse_labels("0,6.0,1", name="l.csv"))
    assert ok.error is None and ok.samples_stored == 3
    late = ingest(video=video, store=tmp_path / "b", labels=parse_labels("0,2,1\n2,6.2,2", name="l.csv"))
    assert late.error == "labels l.csv: line 2 (2 s to 6.2 s, label 2): ends after the end of the recording (6.000 s)"
    assert [s.label for s in SampleStore(tmp_path / "b").iter_samples()] == [1, 2, 2]  # stored samples stay


def test_a_word_across_a_chunk_edge_of_a_camera_without_cuts_is_not_cut(tmp_path):
    """One 6 s shot chunked every 2 s: a word spoken across the chunk edge at 2 s is held whole by a window."""
    p = tmp_path / "still.avi"
    vw = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 25, (160, 120))
    base = cv2.resize(skimage.data.astronaut(), (160, 120))[:, :, ::-1].astype(np.float32)
    rng = np.random.default_rng(1)
    for _ in range(150):
        vw.write(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    vw.release()
    y = _track([[1.82], [], []], noise_rms=0.003)  # the word spans 1.82-2.17 s
    sf.write(tmp_path / "a.wav", y, SR, subtype="FLOAT")
    st = SampleStore(tmp_path / "s")
    ingest(video=p, audio=tmp_path / "a.wav", store=st, keyframe_options={"max_interval": 2.0})
    full = mel_power(y, MelParams())
    assert any(_holds_word(_locate(s.audio, full), 1.82) for s in st.iter_samples() if s.audio is not None)
    assert len(st) >= 3
