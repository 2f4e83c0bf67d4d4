"""Training-time augmentation of a batch: camera framing and light for keyframes, noise, shift and gain for audio.

Pure tensor functions (no I/O), applied to a batch dict of :mod:`fedge.common.training` (``image`` (B, 3, S, S) in
[0, 1], ``audio`` (B, n_mels, T) log-mel dB) before the forward pass. Why each one:

* image: the card is framed differently by every camera (position, distance, a slight tilt) and lit
  differently (brightness, contrast, white balance), so keyframes are randomly shifted, scaled, rotated and
  re-lit; a device's few hundred keyframes otherwise teach the encoder one framing.
* audio: a device's microphone hears its own noise, level and timing. White noise is added at a random SNR
  in the power domain (down to ``snr_db[0]``, where the digit is barely audible: the model must learn that such
  audio is unreliable and lean on the image); the window is shifted in time and its level changed. The features
  keep the store's ``power_to_db(top_db=80)`` floor. A device hears a handful of voices, so each window's
  frequency axis is also warped (vocal tract length perturbation) and its time axis stretched (speaking rate):
  the voices no device has are what the model is judged on.
* inputs that hold no class (outlier exposure): featureless noise and scenes, and *scrambled* real inputs, a
  window played backwards with its pieces shuffled, the start of one word joined to the end of another, a
  keyframe with its tiles shuffled. Those look like speech
  and like a card but say nothing; a head taught to answer them with "I cannot tell" is less sure of words it
  never learned (another language, another vocabulary) instead of mapping them confidently onto a digit.

Randomness comes from the ``torch.Generator`` passed in (deterministic in its seed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_audio", "augment_batch", "augment_image", "outlier_audio", "outlier_image", "scramble_audio",
           "scramble_image", "splice_audio", "warp_audio"]

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


def warp_audio(
    x: Tensor,
    gen: torch.Generator,
    *,
    freq: tuple[float, float] = (0.88, 1.12),
    rate: tuple[float, float] = (0.85, 1.18),
) -> Tensor:
    """Vocal tract length and speaking rate perturbation of log-mel windows: (B, n_mels, T) -> same shape.

    The mel axis is scaled about its lowest band by a random factor in ``freq`` (a longer or shorter vocal
    tract moves every formant by about the same factor) and the time axis about the window's centre by one
    in ``rate``; values are interpolated in dB, and bands or frames that come from outside the window repeat
    its edge.
    """
    b = x.shape[0]
    if b == 0:
        return x
    f = _uniform(gen, b, math.log(freq[0]), math.log(freq[1])).exp()
    r = _uniform(gen, b, math.log(rate[0]), math.log(rate[1])).exp()
    zero, one = torch.zeros(b), torch.ones(b)
    # affine_grid maps output to input coordinates in [-1, 1]; rows are (time=x, mel=y)
    theta = torch.stack([torch.stack([r, zero, zero], 1), torch.stack([zero, 1 / f, 1 / f - one], 1)], 1)
    img = x.float().unsqueeze(1)  # (B, 1, n_mels, T)
    grid = F.affine_grid(theta, list(img.shape), align_corners=True)
    y = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True).squeeze(1)
    return y.to(x.dtype)


def scramble_audio(x: Tensor, gen: torch.Generator, *, pieces: int = 4) -> Tensor:
    """Speech-like windows that say nothing: each window reversed in time, cut in ``pieces`` and shuffled."""
    b, _, t = x.shape
    if b == 0:
        return x
    y = x.flip(-1)
    bounds = torch.linspace(0, t, pieces + 1).round().to(torch.long).tolist()
    chunks = [y[..., lo:hi] for lo, hi in itertools.pairwise(bounds)]
    order = torch.randperm(pieces, generator=gen).tolist()
    if order == list(range(pieces)):
        order = order[1:] + order[:1]
    return torch.cat([chunks[i] for i in order], dim=-1)


def splice_audio(x: Tensor, label: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Chimera words: the first part of each window joined to the rest of another window of a different class.

    Returns (spliced windows, ok (B,) bool): ``ok`` is False where no partner with another label was found (the
    window is returned as it was). A cut at a random point between 30% and 70% of the window; the result
    sounds like speech and shares pieces with two words but is neither.
    """
    b, _, t = x.shape
    if b < 2:
        return x, torch.zeros(b, dtype=torch.bool)
    partner = torch.randperm(b, generator=gen)
    ok = label != label[partner]
    cut = (_uniform(gen, b, 0.3, 0.7) * t).round().to(torch.long)  # (B,)
    first = torch.arange(t).unsqueeze(0) < cut.unsqueeze(1)  # (B, T)
    y = torch.where(first.unsqueeze(1), x, x[partner])
    return torch.where(ok.view(b, 1, 1), y, x), ok


def scramble_image(x: Tensor, gen: torch.Generator, *, tiles: int = 4) -> Tensor:
    """Keyframes that show a card but no digit: the frame cut in ``tiles`` x ``tiles`` and the tiles shuffled."""
    b, c, h, w = x.shape
    if b == 0 or h % tiles or w % tiles:
        return x
    th, tw = h // tiles, w // tiles
    t = x.reshape(b, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, tiles * tiles, c, th, tw)
    t = t[:, torch.randperm(tiles * tiles, generator=gen)]
    return t.reshape(b, tiles, tiles, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


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


def augment_batch(batch: Mapping[str, Tensor], gen: torch.Generator, *, outlier_p: float = 0.2) -> dict[str, Tensor]:
    """The batch with its ``image`` and ``audio`` augmented, and ``reliable`` (B, M) added.

    In samples that carry both modalities, each modality is replaced with probability ``outlier_p`` by an
    input that holds no digit at all (:func:`outlier_image`, :func:`outlier_audio`, or the input scrambled,
    :func:`scramble_image`, :func:`scramble_audio`, :func:`splice_audio`; at most one per sample) and
    marked unreliable (``reliable`` 0). :func:`fedge.common.fusion.fusion_loss` teaches that modality's own head to
    answer such inputs with a uniform distribution (outlier exposure, Hendrycks et al. 2019) while the fused
    output must still name the digit from the other modality: the model learns to say when an input is
    useless rather than to guess confidently. Other keys are passed through.
    """
    out = dict(batch)
    image, audio = augment_image(batch["image"], gen), augment_audio(warp_audio(batch["audio"], gen), gen)
    b = image.shape[0]
    both = batch["mask"].to(torch.bool).all(dim=1)
    pick = (torch.rand(b, generator=gen) < outlier_p) & both
    which = torch.randint(0, 2, (b,), generator=gen)  # 0: the image is broken, 1: the audio
    bad_img, bad_aud = pick & (which == 0), pick & (which == 1)
    scrambled = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1)  # half the outliers: scrambled real inputs
    junk_img = torch.where(scrambled.view(b, 1, 1, 1), scramble_image(image, gen),
                           outlier_image(b, image.shape[-1], gen).to(image.dtype))
    spliced, ok = splice_audio(audio, batch["label"], gen)
    use_splice = (torch.rand(b, generator=gen) < 0.5) & ok  # of the scrambled audio, half are chimera words
    speechlike = torch.where(use_splice.view(b, 1, 1), spliced, scramble_audio(audio, gen))
    junk_aud = torch.where(scrambled, speechlike,
                           outlier_audio(b, audio.shape[1], audio.shape[2], gen).to(audio.dtype))
    image = torch.where(bad_img.view(b, 1, 1, 1), junk_img, image)
    audio = torch.where(bad_aud.view(b, 1, 1), junk_aud, audio)
    out["image"], out["audio"] = image, audio
    out["reliable"] = torch.stack([~bad_img, ~bad_aud], dim=1).float()
    return out
