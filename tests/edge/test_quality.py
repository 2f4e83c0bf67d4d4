"""Quality measures (common/media/quality.py) against OpenCV / hand references, and the gate (edge/quality.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

from fedge.common.media.quality import (
    audio_score,
    audio_stats,
    hamming,
    image_score,
    image_stats,
    laplacian_variance,
    phash,
    to_gray,
)
from fedge.edge.quality import QualityGate, detect_modalities


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.resize(skimage.data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)  # RGB uint8


def _tone(db: float, seconds: float = 0.5, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (10 ** (db / 20) * np.sqrt(2) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_laplacian_variance_matches_opencv(photo):
    g = to_gray(photo)
    ref = cv2.Laplacian(g, cv2.CV_32F, ksize=1)[1:-1, 1:-1].var()
    assert laplacian_variance(g) == pytest.approx(float(ref), rel=1e-4)
    np.testing.assert_allclose(g, cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY).astype(np.float32), atol=1.0)


def test_blur_lowers_sharpness_and_score(photo):
    sharp = image_stats(photo)
    blurred = image_stats(cv2.GaussianBlur(photo, (0, 0), 3))
    assert blurred.sharpness < sharp.sharpness / 20
    assert image_score(sharp) > 0.9
    assert image_score(blurred) < 0.2


def test_exposure_measures(photo):
    dark = (photo * 0.03).astype(np.uint8)
    bright = np.clip(photo.astype(int) + 235, 0, 255).astype(np.uint8)
    assert image_stats(dark).dark_fraction > 0.95 and image_stats(bright).bright_fraction > 0.8
    assert image_score(image_stats(dark)) == 0.0 and image_score(image_stats(bright)) < 0.2


def test_phash_finds_near_duplicates_and_separates_different_photos(photo):
    h = phash(photo)
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 40])[1], cv2.IMREAD_UNCHANGED)
    assert hamming(h, phash(cv2.resize(photo, (100, 100)))) <= 4
    assert hamming(h, phash(noisy)) <= 4
    assert hamming(h, phash(jpeg)) <= 4
    assert hamming(h, phash(np.clip(photo.astype(int) + 30, 0, 255).astype(np.uint8))) <= 4
    others = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    assert all(hamming(h, phash(o)) >= 16 for o in others)
    assert hamming(0, (1 << 64) - 1) == 64


def test_audio_level_and_clipping():
    s = audio_stats(_tone(-20.0))
    assert s.rms_dbfs == pytest.approx(-20.0, abs=0.05) and s.clip_fraction == 0.0
    assert audio_stats(np.zeros(100, np.float32)).rms_dbfs == float("-inf")
    clipped = np.clip(_tone(0.0) * 3, -1, 1)
    assert audio_stats(clipped).clip_fraction > 0.5
    assert audio_score(audio_stats(_tone(-20.0))) == 1.0
    assert audio_score(audio_stats(_tone(-75.0))) == 0.0
    assert 0.0 < audio_score(audio_stats(_tone(-45.0))) < 1.0
    assert audio_score(audio_stats(clipped)) == 0.0


def test_modality_detection():
    img = np.zeros((8, 8, 3), np.uint8)
    aud = np.zeros(10, np.float32)
    assert detect_modalities(image=img, audio=aud) == ("image", "audio")
    assert detect_modalities(image=None, audio=aud) == ("audio",)
    assert detect_modalities(image=img, audio=None) == ("image",)
    assert detect_modalities(image=None, audio=np.zeros(0)) == ()


def test_gate_accepts_cleans_rejects_and_counts(photo):
    gate = QualityGate()
    ok = gate.assess(image=photo, audio=_tone(-20.0))
    assert ok.modalities == ("image", "audio") and ok.reasons == () and min(ok.quality) > 0.8
    dup = gate.assess(image=cv2.resize(photo, (200, 200)), audio=_tone(-25.0))  # same scene again: image cleaned
    assert dup.modalities == ("audio",) and dup.reasons == ("image:duplicate",) and dup.quality[0] == 0.0
    blurred = gate.assess(image=cv2.GaussianBlur(skimage.data.coffee(), (0, 0), 6), audio=None)
    assert not blurred.accepted and blurred.reasons == ("image:blurred",)
    dark = gate.assess(image=(skimage.data.chelsea() * 0.02).astype(np.uint8), audio=np.zeros(8000, np.float32))
    assert not dark.accepted and set(dark.reasons) == {"image:dark", "audio:silent"}
    over = gate.assess(image=np.full((64, 64, 3), 250, np.uint8), audio=np.clip(_tone(0.0) * 3, -1, 1))
    assert set(over.reasons) == {"image:overexposed", "audio:clipped"}
    assert gate.counts == {"image:duplicate": 1, "image:blurred": 1, "image:dark": 1, "audio:silent": 1,
                           "image:overexposed": 1, "audio:clipped": 1}
    assert (gate.accepted, gate.rejected) == (2, 3)


def test_gate_duplicate_memory_is_bounded(photo):
    gate = QualityGate(dup_memory=2)
    others = [skimage.data.chelsea(), skimage.data.coffee()]
    assert gate.assess(image=photo).accepted
    for o in others:
        assert gate.assess(image=o).accepted
    assert gate.assess(image=photo).accepted  # forgotten after two newer keyframes
    with pytest.raises(ValueError, match="max_dark"):
        QualityGate(max_dark=2.0)
