"""AV digits: device plans, rendered camera/microphone streams, held-out split (fast unit tests)."""

import json
import wave

import cv2
import numpy as np
import pytest

from fedge.simulations import avdigits


def test_plans_are_deterministic_in_the_seed():
    a = avdigits.plan_devices(5, samples_per_device=12, seed=3)
    b = avdigits.plan_devices(5, samples_per_device=12, seed=3)
    c = avdigits.plan_devices(5, samples_per_device=12, seed=4)
    assert all(np.array_equal(x.labels, y.labels) and np.array_equal(x.images, y.images) for x, y in zip(a, b))
    assert any(not np.array_equal(x.labels, y.labels) for x, y in zip(a, c))


def test_image_labels_match_the_digit_shown():
    _, y = avdigits.digit_images()
    for p in avdigits.plan_devices(3, samples_per_device=20, seed=0):
        assert np.array_equal(y[p.images], p.labels)


def test_speaker_partition_gives_each_device_one_voice():
    plans = avdigits.plan_devices(10, samples_per_device=15, seed=0, partition="speaker")
    assert [set(p.speakers.tolist()) for p in plans] == [{i} for i in range(10)]


def test_dirichlet_partition_skews_labels_and_missing_fractions_are_exact():
    plans = avdigits.plan_devices(20, samples_per_device=50, seed=0, partition="dirichlet", dirichlet_alpha=0.1,
                                  missing_image=0.15, missing_audio=0.15)
    top_share = np.mean([np.bincount(p.labels, minlength=10).max() / 50 for p in plans])
    assert top_share > 0.5  # alpha=0.1: most of a device's shots show one or two digits
    mods = [p.modalities for p in plans]
    assert mods.count(("audio",)) == 3 and mods.count(("image",)) == 3


def test_heldout_images_are_never_training_images():
    train, test = avdigits.image_split(0)
    assert not set(train) & set(test)
    held = avdigits.heldout_plan(100, seed=0)
    assert set(held.images.tolist()) <= set(test.tolist())
    assert np.bincount(held.labels, minlength=10).min() == 10


def test_rendered_streams_have_one_shot_per_sample(tmp_path):
    plan = avdigits.plan_devices(1, samples_per_device=6, seed=1)[0]
    streams = avdigits.render_device(plan, tmp_path, fps=8, shot_s=1.0, size=48, image_noise=0.03, snr_db=20)
    assert sorted(s.label for s in streams) == sorted(set(plan.labels.tolist()))
    for s in streams:
        cap = cv2.VideoCapture(str(s.video))
        n = 0
        while cap.grab():
            n += 1
        assert n == 8 * s.shots
        with wave.open(str(s.audio)) as w:
            assert w.getframerate() == 16000 and w.getnchannels() == 1
            assert w.getnframes() == 16000 * s.shots


def test_speech_is_loud_inside_each_shot_and_camera_only_devices_get_no_audio(tmp_path):
    _, rate, clips = avdigits.speech_clips()
    rng = np.random.default_rng(0)
    y = avdigits.render_track([[clips[0][3]] * 3, [clips[1][3]] * 3], rate=rate, shot_s=1.0, snr_db=20, rng=rng)
    # every 250 ms of every shot holds speech far above the noise floor: any window hears the shot's digit
    frames = np.sqrt((y.reshape(8, -1) ** 2).mean(1))
    noise = np.sqrt(np.mean(np.concatenate([clips[0][3], clips[1][3]]) ** 2) / 100)  # 20 dB below speech
    assert (frames > 2 * noise).all(), frames / noise
    plan = avdigits.DevicePlan(pid=0, labels=np.array([1, 1]), images=np.array([1, 11]), speakers=np.array([0, 0]),
                               modalities=("image",), seed=1)
    streams = avdigits.render_device(plan, tmp_path, fps=8, shot_s=1.0, size=32, image_noise=0.0, snr_db=20)
    assert streams[0].audio is None and streams[0].video is not None


def test_unknown_partition_is_refused():
    with pytest.raises(ValueError, match="partition"):
        avdigits.plan_devices(2, samples_per_device=2, seed=0, partition="bogus")


def test_cloud_share_uses_training_images_no_device_records():
    train, _ = avdigits.image_split(0)
    plans = avdigits.plan_devices(4, samples_per_device=30, seed=0)
    cloud = avdigits.cloud_plan(100, seed=0, devices=plans)
    used = set(np.concatenate([p.images for p in plans]).tolist())
    assert set(cloud.images.tolist()) <= set(train.tolist()) - used
    _, y = avdigits.digit_images()
    assert np.array_equal(y[cloud.images], cloud.labels) and np.bincount(cloud.labels, minlength=10).min() == 10


def test_heldout_voices_are_speakers_no_device_hears():
    train_names, rate, _ = avdigits.voice_set("train")
    unseen, other = avdigits.voice_set("unseen"), avdigits.voice_set("other")
    meta = json.loads((avdigits.HELDOUT_ASSETS / "voices.json").read_text())
    langs = {s["speaker"]: s["language"] for s in meta["speakers"]}
    train_voices = {s["voice"] for s in json.loads((avdigits.ASSETS / "speakers.json").read_text())["speakers"]}
    assert not set(unseen[0]) & set(train_names) and not set(other[0]) & set(train_names)
    assert not {s["voice"] for s in meta["speakers"]} & train_voices
    assert {langs[n] for n in unseen[0]} == {"en"} and "en" not in {langs[n] for n in other[0]}
    assert unseen[1] == other[1] == rate
    assert all(len(row) == avdigits.NUM_CLASSES and min(len(c) for c in row) > rate // 10 for row in other[2])


def test_heldout_device_of_another_voice_set_shows_the_same_images():
    a = avdigits.heldout_plan(40, seed=3)
    b = avdigits.heldout_plan(40, seed=3, voices="unseen")
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)
    assert b.speakers.max() < len(avdigits.voice_set("unseen")[0])


def test_unknown_voice_set_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown voice set 'xx'.*unseen"):
        avdigits.voice_set("xx")


def test_once_mode_speaks_each_shots_digit_once_at_a_random_moment_inside_it():
    _, rate, clips = avdigits.speech_clips()
    rng = np.random.default_rng(0)
    takes = [[clips[k % 10][k % 10]] for k in range(20)]
    y, spans, power = avdigits.speech_track(takes, rate=rate, shot_s=1.5, rng=rng, speech="once")
    shot = int(1.5 * rate)
    assert len(spans) == 20 and y.size == 20 * shot
    offsets = []
    for k, (a, b) in enumerate(spans):
        assert k * shot <= a < b <= (k + 1) * shot and b - a == len(takes[k][0])
        offsets.append((a - k * shot) / (shot - (b - a)))  # where in the room the take had
    assert min(offsets) < 0.2 and max(offsets) > 0.8  # start, middle and end of shots all occur
    silent = np.ones(y.size, bool)
    for a, b in spans:
        silent[a:b] = False
    assert not y[silent].any() and power == pytest.approx(np.mean([np.mean(t[0] ** 2) for t in takes]), rel=1e-5)
    with pytest.raises(ValueError, match="speech must be one of fill, once"):
        avdigits.speech_track(takes, rate=rate, shot_s=1.5, rng=rng, speech="twice")


def test_render_track_defaults_to_fill_over_white_noise_and_pink_noise_falls_with_frequency(tmp_path):
    _, rate, clips = avdigits.speech_clips()
    takes = [[clips[0][3]] * 3, [clips[1][3]] * 3]
    a = avdigits.render_track(takes, rate=rate, shot_s=1.0, snr_db=20, rng=np.random.default_rng(0))
    b = avdigits.render_track(takes, rate=rate, shot_s=1.0, snr_db=20, rng=np.random.default_rng(0), speech="fill",
                              noise="white")
    np.testing.assert_array_equal(a, b)
    pink = avdigits.background_noise(1 << 16, power=0.01, colour="pink", rng=np.random.default_rng(1))
    spec = np.abs(np.fft.rfft(pink)) ** 2
    f = np.fft.rfftfreq(pink.size, 1 / rate)
    low, high = spec[(f > 100) & (f < 200)].mean(), spec[(f > 3200) & (f < 6400)].mean()
    assert pink.var() == pytest.approx(0.01, rel=0.02) and 10 < low / high < 60  # 1/f: ~32x over 5 octaves
    plan = avdigits.DevicePlan(pid=0, labels=np.array([2, 2, 2]), images=np.array([1, 11, 21]),
                               speakers=np.array([0, 1, 2]), seed=3)
    (s,) = avdigits.render_device(plan, tmp_path, fps=8, shot_s=1.0, size=32, image_noise=0.0, snr_db=20,
                                  speech="once")
    with wave.open(str(s.audio)) as w:
        assert w.getnframes() == 3 * rate


def test_snr_spread_gives_each_recording_its_own_noise_floor(tmp_path):
    rate = avdigits.speech_clips()[1]
    plan = avdigits.DevicePlan(pid=0, labels=np.arange(6), images=np.arange(6), speakers=np.zeros(6, np.int64),
                               modalities=("audio",), seed=5)

    def floors(spread: float) -> np.ndarray:  # noise power in the quietest 50 ms of each one-word recording
        out = []
        for s in avdigits.render_device(plan, tmp_path / str(spread), fps=8, shot_s=1.0, size=32, image_noise=0.0,
                                        snr_db=0.0, snr_db_spread=spread, speech="once"):
            with wave.open(str(s.audio)) as w:
                x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32767
            frames = (x[: len(x) // 800 * 800].reshape(-1, 800) ** 2).mean(1)
            out.append(frames.min() / frames.max())
        return np.log10(np.array(out))

    fixed, spread = floors(0.0), floors(60.0)
    assert np.ptp(fixed) < 1.0  # one SNR: the floors agree within 10 dB
    assert np.ptp(spread) > 2.0 and spread.min() < fixed.max()  # 0..60 dB: floors tens of dB apart
