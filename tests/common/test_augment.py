"""Training-time augmentation: shapes, ranges, determinism, and the outlier inputs marked unreliable."""

from __future__ import annotations

import torch

from fedge.common.augment import (TOP_DB, augment_audio, augment_batch, augment_image, outlier_audio, scramble_audio,
                            scramble_image, splice_audio, warp_audio)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_image_augmentation_keeps_shape_and_range_and_is_deterministic_in_the_seed():
    x = torch.rand(6, 3, 32, 32, generator=_gen(1))
    a, b = augment_image(x, _gen(5)), augment_image(x, _gen(5))
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.allclose(a, x)


def test_audio_noise_at_low_snr_buries_the_pattern_and_keeps_the_store_floor():
    x = torch.full((4, 40, 32), -80.0)
    x[:, 10:12, :] = -10.0  # a loud band: the "speech"
    y = augment_audio(x, _gen(2), noise_p=1.0, snr_db=(-10.0, -10.0), shift=0.0, gain_db=0.0)
    band, rest = y[:, 10:12].mean(), y[:, 20:].mean()
    assert float(band - rest) < float(x[:, 10:12].mean() - x[:, 20:].mean())  # contrast lost to the noise
    assert torch.all(y >= y.amax(dim=(1, 2), keepdim=True) - TOP_DB - 1e-4)


def test_audio_time_shift_is_circular():
    x = torch.randn(3, 40, 32, generator=_gen(3)) * 10 - 40
    y = augment_audio(x, _gen(4), noise_p=0.0, shift=0.25, gain_db=0.0)
    for i in range(3):  # each window is a roll of its input
        assert any(torch.allclose(y[i], torch.roll(x[i], s, dims=1), atol=1e-4) for s in range(-8, 9))


def test_outliers_replace_one_modality_of_two_modality_samples_only_and_are_marked():
    n = 400
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[: n // 2, 1] = False  # half the samples are image-only
    batch = {"image": torch.rand(n, 3, 16, 16), "audio": torch.randn(n, 40, 32) - 40, "mask": mask,
             "label": torch.zeros(n, dtype=torch.long)}
    out = augment_batch(batch, _gen(7), outlier_p=0.5)
    rel = out["reliable"]
    assert rel.shape == (n, 2) and torch.all(rel[: n // 2] == 1)  # single-modality samples are never broken
    assert torch.all(rel.sum(1) >= 1)  # at most one modality per sample
    assert 0.3 < float((rel[n // 2:] == 0).any(1).float().mean()) < 0.7
    assert torch.equal(out["label"], batch["label"])


def test_outlier_audio_respects_the_top_db_floor():
    y = outlier_audio(5, 40, 32, _gen(9))
    assert y.shape == (5, 40, 32)
    assert torch.all(y >= y.amax(dim=(1, 2), keepdim=True) - TOP_DB - 1e-4)


def test_warp_moves_a_formant_by_the_factor_and_keeps_the_lowest_band():
    x = torch.full((1, 40, 20), -80.0)
    x[:, 0, :] = -5.0  # the lowest band: stays where it is
    x[:, 19, :] = -10.0  # a "formant" at band 19 of 0..39
    up = warp_audio(x, _gen(0), freq=(1.2, 1.2), rate=(1.0, 1.0))
    assert int(up[0, 1:, 10].argmax()) + 1 in (22, 23, 24)  # 19 * 1.2 ~ 23: moved up by the factor
    assert float(up[0, 0, 10]) > -20.0
    same = warp_audio(x, _gen(0), freq=(1.0, 1.0), rate=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-3)


def test_scrambled_inputs_keep_their_values_but_not_their_order():
    x = torch.randn(4, 40, 32, generator=_gen(1))
    y = scramble_audio(x, _gen(2))
    assert y.shape == x.shape and torch.allclose(y.sort(-1).values, x.sort(-1).values)  # same frames...
    assert not torch.allclose(y, x) and not torch.allclose(y, x.flip(-1))  # ...in another order
    im = torch.rand(3, 3, 32, 32, generator=_gen(3))
    s = scramble_image(im, _gen(4))
    assert s.shape == im.shape and not torch.allclose(s, im)
    assert torch.allclose(s.flatten(1).sort(-1).values, im.flatten(1).sort(-1).values)  # same pixels, moved


def test_spliced_words_join_two_classes_and_leave_windows_without_a_partner_alone():
    b, t = 8, 32
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 40, t).clone()  # window i holds value i
    label = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y, ok = splice_audio(x, label, _gen(5))
    for i in range(b):
        vals = y[i, 0].unique()
        if ok[i]:
            assert len(vals) == 2 and float(y[i, 0, 0]) == i  # starts with its own word...
            other = int(y[i, 0, -1])
            assert label[other] != label[i]  # ...and ends with a word of another class
            assert 0.25 * t <= int((y[i, 0] == i).sum()) <= 0.75 * t
        else:
            assert torch.equal(y[i], x[i])
    assert ok.any()
    same, ok1 = splice_audio(x, torch.zeros(b, dtype=torch.long), _gen(5))
    assert not ok1.any() and torch.equal(same, x)  # one class: nothing to splice with
