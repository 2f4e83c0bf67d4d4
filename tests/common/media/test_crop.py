"""Salient crop: a small card in a scene is boxed; a frame-filling card or a flat frame is left whole."""

from __future__ import annotations

import cv2
import numpy as np

from fedge.common.dataset import decode_image
from fedge.common.media.crop import salient_box
from fedge.simulations import avdigits


def _card_in_scene(seed: int, card: int = 40, side: int = 192) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    imgs, _ = avdigits.digit_images()
    shot = avdigits.render_shot(imgs[seed], 2, size=card, noise=0.03, rng=rng)[0]
    scene = avdigits._background(rng, side).astype(np.float32) + rng.normal(0, 8, (side, side, 3))
    scene = scene.clip(0, 255).astype(np.uint8)
    y, x = (int(v) for v in rng.integers(0, side - card, 2))
    scene[y:y + card, x:x + card] = shot
    return scene, (x, y, x + card, y + card)


def test_a_small_card_in_a_noisy_scene_is_kept_whole_and_most_of_the_scene_cut():
    areas = []
    for seed in range(8):
        scene, (x0, y0, x1, y1) = _card_in_scene(seed)
        bx0, by0, bx1, by1 = salient_box(scene)
        assert bx0 <= x0 + 4 and by0 <= y0 + 4 and bx1 >= x1 - 4 and by1 >= y1 - 4  # the card is inside
        areas.append((bx1 - bx0) * (by1 - by0) / (scene.shape[0] * scene.shape[1]))
    assert np.mean(areas) < 0.5  # the whole frame would be 1


def test_a_frame_filling_card_and_a_flat_frame_are_left_whole():
    rng = np.random.default_rng(0)
    imgs, _ = avdigits.digit_images()
    full = avdigits.render_shot(imgs[3], 2, size=96, noise=0.03, rng=rng)[0]
    assert salient_box(full) == (0, 0, 96, 96)
    assert salient_box(np.full((50, 80, 3), 128, np.uint8)) == (0, 0, 80, 50)


def test_decode_image_gives_the_model_the_card_not_the_scene():
    scene, _ = _card_in_scene(2)  # a card away from the frame's edges
    box = salient_box(scene)
    assert box != (0, 0, 192, 192)
    ok, buf = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    cropped, whole = decode_image(buf.tobytes(), 32), decode_image(buf.tobytes(), 32, crop=False)
    assert cropped.shape == whole.shape == (3, 32, 32)
    x0, y0, x1, y1 = box
    want = cv2.resize(cv2.imdecode(buf, cv2.IMREAD_COLOR)[y0:y1, x0:x1], (32, 32), interpolation=cv2.INTER_AREA)
    assert np.allclose(cropped, want[:, :, ::-1].transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert not np.allclose(cropped, whole, atol=0.05)
