"""A generated audio-visual classification task, deterministic per seed, for tests and the quickstart.

Each class c has a fixed visual prototype (a smooth random pattern) and a fixed audio prototype (two
formant-like mel bands with a class-specific temporal rhythm). Samples add shifts, gain, and noise.
Prototypes depend on ``proto_seed`` only, so every device and the server share the same task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import MODALITIES

if TYPE_CHECKING:
    from .config import FedgeConfig

__all__ = ["device_partition", "make_av_dataset", "save_heldout"]


def _prototypes(num_classes: int, image_size: int, n_mels: int, frames: int, proto_seed: int):
    rng = np.random.default_rng(proto_seed)
    # image: 6x6 random pattern per class, upsampled (nearest-neighbour blocks, then a 3x3 blur)
    coarse = rng.random((num_classes, 3, 6, 6)).astype(np.float32)
    rep = int(np.ceil(image_size / 6))
    img = np.repeat(np.repeat(coarse, rep, axis=2), rep, axis=3)[:, :, :image_size, :image_size]
    k = np.ones(3, dtype=np.float32) / 3
    img = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 3, img)
    img = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 2, img)
    # audio: two bands per class and a class-specific modulation frequency
    bands = np.stack([rng.choice(n_mels - 4, size=2, replace=False) + 2 for _ in range(num_classes)])
    rates = rng.uniform(0.5, 4.0, size=num_classes)
    return img, bands, rates


def make_av_dataset(
    n: int,
    *,
    seed: int,
    num_classes: int = 10,
    image_size: int = 32,
    n_mels: int = 40,
    frames: int = 32,
    label_probs: np.ndarray | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    image_noise: float = 0.25,
    audio_snr_db: float = 6.0,
    proto_seed: int = 1234,
) -> dict[str, np.ndarray]:
    """Generate ``n`` samples.

    Returns a dict: ``image`` (n, 3, S, S) float32 in [0, 1], ``audio`` (n, n_mels, frames) float32 log-mel
    dB, ``label`` (n,) int64, ``mask`` (n, 2) bool (which modalities each sample has), ``quality`` (n, 2).
    """
    rng = np.random.default_rng(seed)
    img_p, bands, rates = _prototypes(num_classes, image_size, n_mels, frames, proto_seed)
    p = np.full(num_classes, 1.0 / num_classes) if label_probs is None else np.asarray(label_probs, float)
    labels = rng.choice(num_classes, size=n, p=p / p.sum()).astype(np.int64)

    # image: shifted prototype, random brightness/contrast, Gaussian sensor noise
    shifts = rng.integers(-3, 4, size=(n, 2))
    base = img_p[labels]
    image = np.empty_like(base)
    for i in range(n):
        image[i] = np.roll(base[i], tuple(shifts[i]), axis=(1, 2))
    gain = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    offset = rng.uniform(-0.1, 0.2, size=(n, 1, 1, 1)).astype(np.float32)
    image = np.clip(image * gain + offset + rng.normal(0, image_noise, image.shape), 0, 1).astype(np.float32)

    # audio: power in two class bands, modulated in time, plus broadband noise at the given SNR
    t = np.arange(frames, dtype=np.float32)
    mel = np.arange(n_mels, dtype=np.float32)
    power = np.zeros((n, n_mels, frames), dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    jitter = rng.normal(0, 0.7, size=(n, 2))
    for i in range(n):
        c = labels[i]
        env = 0.6 + 0.4 * np.sin(2 * np.pi * rates[c] * t / frames + phase[i])
        for j in range(2):
            prof = np.exp(-0.5 * ((mel - bands[c, j] - jitter[i, j]) / 1.2) ** 2)
            power[i] += np.outer(prof, env).astype(np.float32)
    noise = rng.exponential(1.0, size=power.shape).astype(np.float32)
    sig_p = power.mean(axis=(1, 2), keepdims=True)
    noise *= sig_p / (10 ** (audio_snr_db / 10))
    level = rng.uniform(0.3, 3.0, size=(n, 1, 1)).astype(np.float32)
    audio = (10 * np.log10(level * (power + noise) + 1e-10)).astype(np.float32)

    mask = np.zeros((n, len(MODALITIES)), dtype=bool)
    for j, m in enumerate(MODALITIES):
        mask[:, j] = m in modalities
    return {
        "image": image,
        "audio": audio,
        "label": labels,
        "mask": mask,
        "quality": np.ones((n, len(MODALITIES)), dtype=np.float32),
    }


def device_partition(
    partition_id: int,
    num_partitions: int,
    *,
    seed: int,
    samples: int,
    num_classes: int = 10,
    partition: str = "iid",
    dirichlet_alpha: float = 0.5,
    missing_image: float = 0.0,
    missing_audio: float = 0.0,
) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Label distribution and modalities of one simulated device (deterministic in seed and id).

    Devices ``[0, missing_image*N)`` have no camera and ``[.., + missing_audio*N)`` no microphone, after a
    seeded shuffle, so the fractions are exact for any N.
    """
    rng = np.random.default_rng([seed, 77])
    order = rng.permutation(num_partitions)
    rank = int(np.flatnonzero(order == partition_id)[0])
    n_no_img = round(missing_image * num_partitions)
    n_no_aud = round(missing_audio * num_partitions)
    if rank < n_no_img:
        mods: tuple[str, ...] = ("audio",)
    elif rank < n_no_img + n_no_aud:
        mods = ("image",)
    else:
        mods = MODALITIES
    probs = None
    if partition == "dirichlet":
        probs = np.random.default_rng([seed, 91, partition_id]).dirichlet([dirichlet_alpha] * num_classes)
    return probs, mods


def save_heldout(path: Path, cfg: FedgeConfig) -> Path:
    """Write the synthetic task's held-out set for ``cfg`` (``data.eval_samples`` samples from a seed no device
    partition uses, shaped for ``cfg.model``) as an NPZ at ``path``, for ``data.eval_path``; returns ``path``."""
    m = cfg.model
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **make_av_dataset(cfg.data.eval_samples, seed=cfg.seed * 100_003 + 99_991,
                                     num_classes=m.num_classes, image_size=m.image_size, n_mels=m.n_mels,
                                     frames=m.audio_frames))
    return path
