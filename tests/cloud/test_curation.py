"""Cloud curation: each stage on its own (pure), then the whole Ray Data pipeline feeding the trainer's reader."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fedge.cloud.curation import (
    CurationParams,
    _audio_window,
    accept_or_clean,
    assess,
    curate,
    curation_report,
    detect,
    extract,
    stretch_contrast,
    synthetic_clips,
    training_columns,
)
from fedge.common.media.audio import mel_power

P = CurationParams()


def _run(clip: dict) -> list[dict]:
    return [accept_or_clean(assess(s), P) for s in extract(detect(clip), P)]


_SHORT = {"seconds": 2.0, "fps": 6.0, "frame_size": 48}  # small clips keep the tests fast


@functools.lru_cache(maxsize=1)
def _corrupted() -> tuple[dict, ...]:
    return tuple(synthetic_clips(16, seed=3, p=P, corrupt=1.0, **_SHORT))


def _clip(kind: str) -> dict:
    return next(r for r in _corrupted() if r["clip_id"].endswith(kind))


def test_detect_names_unusable_streams_and_keeps_the_rest() -> None:
    good = synthetic_clips(1, seed=0, p=P, **_SHORT)[0]
    assert detect(good)["has_video"] and detect(good)["has_audio"]
    bad_frames = dict(good, frames=good["frames"].astype(np.float32))
    r = detect(bad_frames)
    assert not r["has_video"] and r["has_audio"] and "image:bad-frames" in r["detect_notes"]
    nan_audio = dict(good, audio=np.full(4000, np.nan, np.float32))
    r = detect(nan_audio)
    assert r["has_video"] and not r["has_audio"] and "audio:non-finite" in r["detect_notes"]
    stereo = dict(good, audio=np.zeros((2, 4000), np.float32))
    assert "audio:bad-waveform" in detect(stereo)["detect_notes"]
    no_sr = dict(good, sr=0)
    assert "audio:bad-sr" in detect(no_sr)["detect_notes"]
    nothing = dict(good, frames=np.zeros((0,), np.uint8), audio=np.zeros((0,), np.float32))
    assert _run(nothing)[0]["status"] == "rejected"


def test_keyframe_per_shot_and_audio_window_aligned_to_its_time() -> None:
    clip = synthetic_clips(1, seed=1, p=P, **_SHORT)[0]
    samples = list(extract(detect(clip), P))
    assert len(samples) == 2  # two shots with a hard cut -> one keyframe each
    cut_time = samples[1]["time"]
    assert samples[0]["time"] < cut_time
    # a click at a known time lands in the middle of the window centred there
    y = np.zeros(3 * P.sr, np.float32)
    y[int(1.3 * P.sr) : int(1.3 * P.sr) + 64] = 0.9
    db, raw = _audio_window(mel_power(y, P.mel), y, 1.3, P)
    assert db.shape == (P.n_mels, P.audio_frames)
    loudest = int(np.argmax(db.mean(axis=0)))
    assert abs(loudest - P.audio_frames // 2) <= 1
    assert np.abs(raw).max() == pytest.approx(0.9)


def test_audio_only_and_video_only_clips_give_single_modality_samples() -> None:
    clip = synthetic_clips(1, seed=2, p=P, **_SHORT)[0]
    audio_only = _run(dict(clip, frames=np.zeros((0,), np.uint8)))
    assert len(audio_only) >= 2 and all(list(s["mask"]) == [False, True] for s in audio_only)
    video_only = _run(dict(clip, audio=np.zeros((0,), np.float32)))
    assert all(list(s["mask"]) == [True, False] for s in video_only)


def test_accept_clean_remove_reject_by_quality() -> None:
    clean = _run(synthetic_clips(1, seed=0, p=P, **_SHORT)[0])
    assert all(s["status"] == "accepted" and s["mask"].all() and (s["quality"] >= P.min_quality).all()
               for s in clean)
    dark = _run(_clip("dark"))
    assert all(s["status"] == "image:cleaned" and s["mask"].all() and s["quality"][0] >= P.min_quality
               for s in dark)
    lens = _run(_clip("lenscap"))
    assert all(s["status"] == "image:removed-low-quality" and list(s["mask"]) == [False, True] for s in lens)
    silent = _run(_clip("silent"))
    assert all(s["status"] == "audio:removed-low-quality" and list(s["mask"]) == [True, False]
               and s["quality"][1] == 0.0 for s in silent)
    both = _run(_clip("both"))
    assert all(s["status"] == "rejected" for s in both)


def test_stretch_contrast_restores_a_dark_frame() -> None:
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32, 3)) * 12).astype(np.uint8)
    out = stretch_contrast(img)
    assert out.max() >= 250 and out.min() <= 5


@pytest.mark.integration
def test_ray_data_pipeline_counts_decisions_and_feeds_the_trainer(ray_session) -> None:
    import ray

    from fedge.cloud.training import _shard_arrays

    clips = synthetic_clips(12, seed=5, p=P, corrupt=0.5, **_SHORT)
    kinds = [c["clip_id"].rsplit("-", 1)[1] for c in clips]
    everything = curate(ray.data.from_items(clips), P, keep_rejected=True).materialize()
    rep = curation_report(everything)
    assert rep.get("rejected", 0) == kinds.count("both")
    assert rep.get("image:cleaned", 0) >= kinds.count("dark")
    assert rep.get("audio:removed-low-quality", 0) >= kinds.count("silent")
    kept = everything.filter(lambda r: r["status"] != "rejected").materialize()
    assert kept.count() == everything.count() - rep.get("rejected", 0)
    data = _shard_arrays(training_columns(kept))
    n = kept.count()
    assert data["image"].shape == (n, 3, P.image_size, P.image_size)
    assert data["audio"].shape == (n, P.n_mels, P.audio_frames)
    assert data["mask"].shape == (n, 2) and data["mask"].any(axis=1).all()
    assert np.isfinite(data["audio"]).all() and (0 <= data["image"]).all() and (data["image"] <= 1).all()
    assert set(np.unique(data["label"])) <= set(range(10))


def test_curation_params_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="min_quality"):
        CurationParams(min_quality=1.5)
    with pytest.raises(ValueError, match="audio_frames"):
        CurationParams(audio_frames=0)
