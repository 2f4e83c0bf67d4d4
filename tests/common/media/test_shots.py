"""Shot-boundary kernels (common/media/frame_features.py, transitions.py, shots.py) on generated frames with known boundaries (no video files)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data as skdata

from fedge.common.media.frame_features import (
    CONTRAST_FLOOR,
    _local_match,
    frame_features,
    hist_distance,
    pair_scores,
    struct_distance,
    thumbnail,
)
from fedge.common.media.scenes import Shot, render, texture
from fedge.common.media.shots import ShotDetector, detect_boundaries
from fedge.common.media.transitions import blend_fit, composite_fit, is_blend, is_composite

SIZE = (160, 120)
STRIDE = 3  # what edge/keyframes.py uses at 30 fps
RATE = 30.0 / STRIDE


def _bgr(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.ndim == 2:
        x = np.dstack([x] * 3)
    return np.ascontiguousarray(x[:, :, 2::-1])


P = {n: _bgr(getattr(skdata, n)()) for n in
     ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "hubble_deep_field", "immunohistochemistry",
      "coins", "clock", "grass", "gravel", "brick", "retina", "cell", "page")}
LEFT, RIGHT = (_bgr(x) for x in skdata.stereo_motorcycle()[:2])
SPRITE = cv2.resize(P["coins"][50:150, 50:150], (40, 40))


def _detect(shots: list[Shot], joins: list[tuple[str, int]], seed: int = 3):
    frames, truth = render(shots, joins, SIZE, seed=seed)
    found = detect_boundaries([(i, f) for i, f in enumerate(frames) if i % STRIDE == 0], rate=RATE)
    return truth, [b.frame for b in found], found


def _assert_found(truth, found, tol: int = 2) -> None:
    assert len(found) == len(truth), f"truth {truth} found {found}"
    for t, f in zip(truth, found):
        assert t.start - tol <= f <= t.end + tol, f"truth {t} found {f}"


# ---------------------------------------------------------------------------------------------- kernels
def test_contrast_normalisation_makes_a_dark_frame_look_like_the_bright_one():
    bright = cv2.resize(P["astronaut"], SIZE)
    dark = (8 + 0.1 * bright.astype(np.float32)).astype(np.uint8)
    fb, fd = frame_features(bright), frame_features(dark)
    assert fd.contrast < fb.contrast / 5
    assert fd.contrast > CONTRAST_FLOOR
    assert np.abs(fb.luma - fd.luma).mean() < 0.15  # same structure after normalisation


def test_colour_histogram_ignores_brightness_but_not_a_new_scene():
    a = cv2.resize(P["coffee"], SIZE)
    dimmer = (a.astype(np.float32) * 0.6).astype(np.uint8)
    other = cv2.resize(P["immunohistochemistry"], SIZE)
    assert pair_scores(frame_features(a), frame_features(dimmer)).hist < 0.15
    assert pair_scores(frame_features(a), frame_features(other)).hist > 0.5


def test_struct_distance_compensates_translation_and_separates_different_images():
    a = frame_features(cv2.resize(P["astronaut"], SIZE)).luma
    moved = np.ascontiguousarray(np.roll(a, (2, 5), axis=(0, 1)))
    other = frame_features(cv2.resize(P["coffee"], SIZE)).luma
    d_moved, dx, dy, _ = struct_distance(a, moved)
    assert (round(dx), round(dy)) == (5, 2)
    assert d_moved < 0.15
    assert struct_distance(a, other)[0] > 0.6
    assert struct_distance(a, a.copy())[0] == 0.0


def test_struct_distance_leaves_its_inputs_untouched():
    a = frame_features(cv2.resize(P["astronaut"], SIZE)).luma
    b = frame_features(cv2.resize(P["coffee"], SIZE)).luma
    a0, b0 = a.copy(), b.copy()
    struct_distance(a, b)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


def test_blend_fit_recovers_a_dissolve_and_its_progress():
    a = cv2.resize(P["astronaut"], SIZE).astype(np.float32)
    b = cv2.resize(P["rocket"], SIZE).astype(np.float32)
    fa, fb = frame_features(a.astype(np.uint8)), frame_features(b.astype(np.uint8))
    shares = []
    for p in (0.3, 0.5, 0.7):
        fm = frame_features(((1 - p) * a + p * b).astype(np.uint8))
        fit = blend_fit(fa.luma, fm.luma, fb.luma, scale_a=fa.scale, scale_b=fb.scale)
        assert abs(fit[1] - p) < 0.1
        assert fit[0] < 0.05 and fit[2] < 0.1  # explained, and only with both ends
        assert is_blend(fit)
        shares.append(fit[1])
    assert shares == sorted(shares)  # the share follows the dissolve's progress


def test_blend_fit_rejects_an_unrelated_middle_frame_and_a_pure_end():
    fa, fm, fb = (frame_features(cv2.resize(P[n], SIZE)) for n in ("astronaut", "coffee", "rocket"))
    assert not is_blend(blend_fit(fa.luma, fm.luma, fb.luma))  # a short shot between two others
    assert not is_blend(blend_fit(fa.luma, fb.luma, fb.luma))  # a hard cut: the middle is the new shot


def test_composite_fit_sees_a_wipe():
    a, b = cv2.resize(P["coffee"], SIZE), cv2.resize(P["moon"], SIZE)
    m = a.copy()
    m[:, :70] = b[:, :70]
    fa, fm, fb = (frame_features(x) for x in (a, m, b))
    fit = composite_fit(fa.luma, fm.luma, fb.luma)
    assert is_composite(fit)
    assert 0.3 < fit[1] < 0.7


def test_detector_rejects_bad_parameters():
    with pytest.raises(ValueError):
        ShotDetector(rate=0)
    with pytest.raises(ValueError):
        ShotDetector(rate=10, z=-1)


# ---------------------------------------------------------------------------------------------- hard cuts
def test_hard_cuts_are_found_within_one_frame():
    shots = [Shot(P[n], 45) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    truth, found, bs = _detect(shots, [("cut", 0)] * 3)
    _assert_found(truth, found, tol=1)
    assert all(b.kind == "cut" for b in bs)


def test_boundaries_come_out_in_order_while_streaming():
    frames, truth = render([Shot(P[n], 40) for n in ("astronaut", "coffee", "moon", "rocket")],
                           [("cut", 0), ("dissolve", 15), ("cut", 0)], SIZE)
    det = ShotDetector(rate=RATE)
    got = []
    for i, f in enumerate(frames):
        if i % STRIDE == 0:
            got += det.push(i, frame_features(f))
            assert len(det._buf) <= det._buf.maxlen  # bounded memory
    got += det.flush()
    frames_found = [b.frame for b in got]
    assert frames_found == sorted(frames_found)
    _assert_found(truth, frames_found)


# ---------------------------------------------------------------------------------------------- no false cuts
NO_CUT = {
    "sensor noise": Shot(P["grass"], 150, noise=12),
    "slow pan": Shot(P["hubble_deep_field"], 150, zoom=2, center=(0.3, 0.5), pan=(1.5, 0.3)),
    "fast pan": Shot(P["astronaut"], 120, zoom=2.5, center=(0.2, 0.5), pan=(8, 0)),
    "zoom in": Shot(P["coffee"], 150, zoom_rate=0.015),
    "zoom out": Shot(P["rocket"], 150, zoom=3, zoom_rate=-0.01),
    "sliding object": Shot(P["brick"], 150, sprite=SPRITE, sprite_speed=4),
    "one-frame flashes": Shot(P["chelsea"], 150, flashes=(20, 61, 100), flash_len=1),
    "two-frame flashes": Shot(P["clock"], 150, flashes=(30, 80), flash_len=2),
    "camera shake": Shot(P["gravel"], 150, zoom=1.5, shake=2.0, noise=4),
    "dark and noisy": Shot(P["coins"], 150, grade=(6, 0.1), noise=3),
}


@pytest.mark.parametrize("name", sorted(NO_CUT))
def test_a_single_shot_has_no_boundary(name):
    truth, found, _ = _detect([NO_CUT[name]], [])
    assert found == [], f"{name}: false boundaries at {found}"


@pytest.mark.parametrize("name", sorted(NO_CUT))
def test_the_cut_between_two_difficult_shots_is_found_once(name):
    other = Shot(P["immunohistochemistry"], 60, noise=3)
    truth, found, _ = _detect([NO_CUT[name], other], [("cut", 0)])
    _assert_found(truth, found)


# ---------------------------------------------------------------------------------------------- gradual
@pytest.mark.parametrize("kind,length", [("dissolve", 12), ("dissolve", 30), ("fade", 14), ("fade", 30),
                                         ("wipe", 15), ("wipe", 24)])
def test_gradual_transitions_are_found_once_inside_the_transition(kind, length):
    shots = [Shot(P["chelsea"], 70), Shot(P["rocket"], 70), Shot(P["cell"], 70)]
    truth, found, _ = _detect(shots, [(kind, length), ("cut", 0)])
    _assert_found(truth, found)


def test_dissolve_between_moving_shots():
    shots = [Shot(P["hubble_deep_field"], 80, zoom=2, pan=(1.0, 0)), Shot(P["coffee"], 80, zoom_rate=0.005)]
    truth, found, _ = _detect(shots, [("dissolve", 20)])
    _assert_found(truth, found)


# ---------------------------------------------------------------------------------------------- hard cases
def test_dark_low_contrast_cuts():
    shots = [Shot(P[n], 45, grade=(6, 0.1), noise=2) for n in ("astronaut", "coffee", "chelsea")]
    truth, found, _ = _detect(shots, [("cut", 0)] * 2)
    _assert_found(truth, found)


def test_near_identical_cuts_reframe_and_stereo_pair():
    shots = [Shot(P["astronaut"], 45), Shot(P["astronaut"], 45, zoom=1.6, center=(0.45, 0.35)),
             Shot(P["coffee"], 45, zoom=1.2), Shot(P["coffee"], 45, zoom=1.2, center=(0.6, 0.5)),
             Shot(LEFT, 45), Shot(RIGHT, 45)]
    truth, found, _ = _detect(shots, [("cut", 0)] * 5)
    _assert_found(truth, found)


def test_short_shots_are_kept():
    shots = [Shot(P["astronaut"], 40), Shot(P["coffee"], 6), Shot(P["rocket"], 8), Shot(P["chelsea"], 5),
             Shot(P["moon"], 40)]
    truth, found, _ = _detect(shots, [("cut", 0)] * 4)
    _assert_found(truth, found)


def test_random_textures_cut_without_photos():
    rng = np.random.default_rng(0)
    shots = [Shot(texture(rng), 40, noise=4) for _ in range(4)]
    truth, found, _ = _detect(shots, [("cut", 0)] * 3)
    _assert_found(truth, found)


# ---------------------------------------------------------------------------------------------- motion, exposure
def test_dissolve_out_of_a_fast_pan():
    # (into a pan this fast, whose histogram drifts as fast as the dissolve changes it, is still missed)
    pan = Shot(P["astronaut"], 80, zoom=2.5, center=(0.3, 0.5), pan=(9.0, 0))
    truth, found, _ = _detect([pan, Shot(P["chelsea"], 70)], [("dissolve", 24)])
    _assert_found(truth, found)


def test_cuts_into_and_out_of_a_short_dark_shot_are_not_a_fade():
    shots = [Shot(P["astronaut"], 45), Shot(P["coffee"], 12, grade=(8, 0.1)), Shot(P["rocket"], 45)]
    truth, found, _ = _detect(shots, [("cut", 0)] * 2)
    _assert_found(truth, found)


def test_cut_from_a_fast_noisy_pan_into_a_still_shot():
    shots = [Shot(P["gravel"], 60, zoom=2.5, pan=(12.0, 0), noise=8), Shot(P["coffee"], 60)]
    truth, found, _ = _detect(shots, [("cut", 0)])
    _assert_found(truth, found)


def test_wipe_from_a_dark_shot_to_a_bright_one():
    shots = [Shot(P["gravel"], 60, grade=(6, 0.15)), Shot(P["page"], 60), Shot(P["chelsea"], 40)]
    truth, found, _ = _detect(shots, [("wipe", 15), ("cut", 0)])
    _assert_found(truth, found)


def test_histogram_distance_sees_grey_images_and_ignores_a_dark_frames_few_colours():
    a, b = frame_features(cv2.resize(P["camera"], SIZE)), frame_features(cv2.resize(P["page"], SIZE))
    assert not a.hist.any() or a.hist.sum() == pytest.approx(1.0)
    assert hist_distance(a, b) > 0.3  # two grey photos: only the grey-level histogram tells them apart
    dark = frame_features((cv2.resize(P["astronaut"], SIZE) * 0.05).astype(np.uint8))
    assert not dark.hist.any()  # almost no pixel bright enough for a colour: no colour evidence at all


# ------------------------------------------------------------------------- fast paths against plain references


@pytest.mark.parametrize("shape", [(360, 640), (1080, 1920), (2160, 3840), (480, 640), (363, 645), (37, 65), (20, 30)])
def test_thumbnail_is_the_area_average_of_the_whole_frame(shape):
    # the halving chain must give what one area resize over every pixel gives, up to uint8 rounding
    rng = np.random.default_rng(0)
    img = cv2.resize(P["astronaut"], shape[::-1], interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    th = thumbnail(noisy)
    tw = min(64, shape[1])
    h, w = shape
    assert th.shape == (max(4, round(h * tw / w)), tw, 3)
    k, hh, ww = 0, h, w  # halvings; each drops an odd last row or column
    while ww >= 8 * tw and hh >= 16:
        k, hh, ww = k + 1, hh // 2, ww // 2
    crop = (slice(0, h - h % 2**k), slice(0, w - w % 2**k))
    ref = cv2.resize(noisy[crop], th.shape[1::-1], interpolation=cv2.INTER_AREA)
    diff = np.abs(th.astype(int) - ref.astype(int))
    assert diff.mean() < 0.75 and diff.max() <= 8  # uint8 rounding after each halving
    # sensor noise is averaged away like in one big area average: what is left is far below the 12 levels
    clean = cv2.resize(img[crop], th.shape[1::-1], interpolation=cv2.INTER_AREA)
    if w >= 10 * tw:
        assert np.std(th.astype(float) - clean) < 2.5
    grey = cv2.cvtColor(noisy, cv2.COLOR_BGR2GRAY)
    assert thumbnail(grey).shape == th.shape[:2]


def _hist_reference(thumb: np.ndarray) -> np.ndarray:
    """The colour histogram written out pixel by pixel (what frame_features computes with calcHist)."""
    hsv = cv2.cvtColor(thumb, cv2.COLOR_BGR2HSV).reshape(-1, 3).astype(np.int64)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    bins = np.where(s < 24, 32, (h * 8 // 180) * 4 + s * 4 // 256)[v >= 24]
    hist = np.bincount(bins, minlength=33).astype(np.float64)
    if hist.sum() < 0.25 * len(hsv):
        return np.zeros(33)
    return hist / max(hist.sum(), 1.0)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera", "moon", "hubble_deep_field", "colour-noise"])
def test_frame_histograms_match_a_pixel_by_pixel_reference(name):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (36, 64, 3), dtype=np.uint8) if name == "colour-noise" else cv2.resize(P[name], (64, 36))
    for frame in (img, (img * 0.3).astype(np.uint8), (img * 0.08).astype(np.uint8)):
        f = frame_features(None, thumb=frame)
        np.testing.assert_allclose(f.hist, _hist_reference(frame), atol=1e-6)
        grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        np.testing.assert_allclose(f.levels, np.bincount((grey >> 4).ravel(), minlength=16) / grey.size, atol=1e-6)


def test_local_match_equals_the_shift_by_shift_definition():
    rng = np.random.default_rng(2)
    for h, w in ((36, 64), (48, 64), (37, 61), (12, 16)):
        a = rng.standard_normal((h, w)).astype(np.float32)
        b = np.roll(a, 1, axis=1) + 0.3 * rng.standard_normal((h, w)).astype(np.float32)
        gw = min(8, w - 2)
        gh = max(1, round(gw * (h - 2) / (w - 2)))
        bh, bw = (h - 2) // gh, (w - 2) // gw
        y0, x0 = 1 + ((h - 2) - gh * bh) // 2, 1 + ((w - 2) - gw * bw) // 2
        best = np.full((gh, gw), np.inf)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                d = np.abs(a[y0:y0 + gh * bh, x0:x0 + gw * bw].astype(np.float64)
                           - b[y0 + dy:y0 + dy + gh * bh, x0 + dx:x0 + dx + gw * bw])
                best = np.minimum(best, d.reshape(gh, bh, gw, bw).mean(axis=(1, 3)))
        assert _local_match(a, b) == pytest.approx(float(np.median(best)), rel=1e-5)
