"""Training-time augmentation of a batch: camera framing and light for keyframes, noise, shift and gain for audio.

Pure tensor functions (no I/O), applied to a batch dict of :mod:`common.training` (``image`` (B, 3, S, S) in
[0, 1], ``audio`` (B, n_mels, T) log-mel dB) before the forward pass. Why each one:

* image: the card is framed differently by every camera (position, distance, a slight tilt) and lit
  differently (brightness, contrast, white balance), so keyframes are randomly shifted, scaled, rotated and
  re-lit; a device's few hundred keyframes otherwise teach the encoder one framing.
* audio: a device's microphone hears its own noise, level and timing. White noise is added at a random SNR
  in the power domain (down to ``snr_db[0]``, where the digit is barely audible: the model must learn that such
  audio is unreliable and lean on the image); the window is shifted in time and its level changed. The features
  keep the store's ``power_to_db(top_db=80)`` floor.

Randomness comes from the ``torch.Generator`` passed in (deterministic in its seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_audio", "augment_batch", "augment_image", "outlier_audio", "outlier_image"]

TOP_DB = 80.0  # the store's log-mel floor: power_to_db(top_db=80)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


def augment_image(
    x: Tensor,
    gen: torch.Generator,
    *,
    shift: float = 0.1,
    scale: tuple[float, float] = (0.85, 1.15),
    rotate_deg: float = 10.0,
    brightness: float = 0.15,
    contrast: tuple[float, float] = (0.7, 1.3),
    colour: float = 0.1,
) -> Tensor:
    """Random framing (shift as a fraction of the side, zoom, rotation) and lighting of keyframes.

    x : (B, 3, S, S) in [0, 1]. Returns the same shape, clipped to [0, 1]; pixels that come from outside the
    frame repeat its border (the scene continues, it does not turn black).
    """
    b = x.shape[0]
    if b == 0:
        return x
    s = _uniform(gen, b, math.log(scale[0]), math.log(scale[1])).exp()  # zoom factor (>1: closer)
    a = _uniform(gen, b, -rotate_deg, rotate_deg) * math.pi / 180
    t = _uniform(gen, b, -2 * shift, 2 * shift, 2)  # affine_grid coordinates span [-1, 1]: 2 = one side
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    c = _uniform(gen, b, *contrast, 1, 1, 1)
    light = _uniform(gen, b, -brightness, brightness, 1, 1, 1)
    tint = _uniform(gen, b, 1 - colour, 1 + colour, 3, 1, 1)
    y = ((y - mean) * c + mean + light) * tint
    return y.clamp(0.0, 1.0)


def augment_audio(
    x: Tensor,
    gen: torch.Generator,
    *,
    noise_p: float = 0.5,
    snr_db: tuple[float, float] = (-10.0, 30.0),
    shift: float = 0.25,
    gain_db: float = 10.0,
    noise_dof: float = 4.0,
) -> Tensor:
    """Additive white noise at a random SNR (a ``noise_p`` share of the windows), time shift and gain.

    x : (B, n_mels, T) log-mel in dB. Noise is added in the power domain: the mean speech power of the window
    over 10^(SNR/10), each cell drawn from a scaled Gamma(``noise_dof``) (a mel band averages a few FFT bins
    of a white spectrum). The time shift is circular by up to ``shift`` of the window (speech repeats in
    the streams, and an utterance may start anywhere in it). Returns (B, n_mels, T) in dB, floored at
    ``max - 80`` per window like the store.
    """
    b, _, t = x.shape
    if b == 0:
        return x
    p = torch.pow(10.0, x.float() / 10.0)
    noisy = torch.rand(b, generator=gen) < noise_p
    snr = _uniform(gen, b, *snr_db)
    level = p.mean(dim=(1, 2)) / torch.pow(10.0, snr / 10.0)  # (B,) noise power per cell
    conc = torch.full(p.shape, noise_dof)
    cells = torch._standard_gamma(conc, generator=gen) / noise_dof  # (B, n_mels, T), mean 1
    p = p + (noisy.float() * level).view(b, 1, 1) * cells
    y = 10.0 * torch.log10(p.clamp_min(1e-10))
    y = torch.maximum(y, y.amax(dim=(1, 2), keepdim=True) - TOP_DB)
    steps = (_uniform(gen, b, -shift, shift) * t).round().to(torch.long)
    idx = (torch.arange(t).unsqueeze(0) - steps.unsqueeze(1)) % t  # (B, T)
    y = torch.gather(y, 2, idx.unsqueeze(1).expand_as(y))
    y = y + _uniform(gen, b, -gain_db, gain_db, 1, 1)
    return y.to(x.dtype)


def outlier_image(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Keyframes with no card: smooth random scenes plus sensor noise, (n, 3, size, size) in [0, 1]."""
    coarse = torch.rand((n, 3, 4, 4), generator=gen)
    scene = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    level = torch.rand((n, 1, 1, 1), generator=gen)
    return (scene * level + 0.1 * torch.randn((n, 3, size, size), generator=gen)).clamp(0.0, 1.0)


def outlier_audio(n: int, n_mels: int, frames: int, gen: torch.Generator) -> Tensor:
    """Windows with no speech: noise of random level, spectral tilt and texture, (n, n_mels, T) in dB."""
    level = _uniform(gen, n, -90.0, -10.0, 1, 1)
    tilt = _uniform(gen, n, -30.0, 30.0, 1, 1) * torch.linspace(-0.5, 0.5, n_mels).view(1, n_mels, 1)
    spread = _uniform(gen, n, 0.5, 12.0, 1, 1)
    y = level + tilt + spread * torch.randn((n, n_mels, frames), generator=gen)
    return torch.maximum(y, y.amax(dim=(1, 2), keepdim=True) - TOP_DB)


def augment_batch(batch: Mapping[str, Tensor], gen: torch.Generator, *, outlier_p: float = 0.1) -> dict[str, Tensor]:
    """The batch with its ``image`` and ``audio`` augmented, and ``reliable`` (B, M) added.

    In samples that carry both modalities, each modality is replaced with probability ``outlier_p`` by an
    input that holds no digit at all (:func:`outlier_image`, :func:`outlier_audio`; at most one per sample) and
    marked unreliable (``reliable`` 0). :func:`common.model.fusion_loss` teaches that modality's own head to
    answer such inputs with a uniform distribution (outlier exposure, Hendrycks et al. 2019) while the fused
    output must still name the digit from the other modality: the model learns to say when an input is
    useless rather than to guess confidently. Other keys are passed through.
    """
    out = dict(batch)
    image, audio = augment_image(batch["image"], gen), augment_audio(batch["audio"], gen)
    b = image.shape[0]
    both = batch["mask"].to(torch.bool).all(dim=1)
    pick = (torch.rand(b, generator=gen) < outlier_p) & both
    which = torch.randint(0, 2, (b,), generator=gen)  # 0: the image is broken, 1: the audio
    bad_img, bad_aud = pick & (which == 0), pick & (which == 1)
    image = torch.where(bad_img.view(b, 1, 1, 1), outlier_image(b, image.shape[-1], gen).to(image.dtype), image)
    audio = torch.where(bad_aud.view(b, 1, 1), outlier_audio(b, audio.shape[1], audio.shape[2], gen).to(audio.dtype),
                        audio)
    out["image"], out["audio"] = image, audio
    out["reliable"] = torch.stack([~bad_img, ~bad_aud], dim=1).float()
    return out
