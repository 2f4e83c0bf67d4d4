"""Classify a device's keyframes / audio windows with the sharded model (the command: :mod:`fedge.edge.cli.predict`).

Inputs: a video file or camera (keyframes by :mod:`fedge.edge.keyframes`), an audio file or a video's audio track
(log-mel by :mod:`fedge.common.media.audio`, as ingest computes it); with both, each keyframe is paired with the audio
window centred on it. ``.npy`` arrays are accepted too: keyframes (B, 3, S, S) float in [0, 1] or (B, S, S, 3)
uint8, log-mel windows (B, n_mels, T) in dB; with both, row i of each is the same moment. The device's modalities
are those given (or those asked for); it downloads only their encoders, the router, the head and the experts its
router picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .inference import Prediction, ShardedRunner

__all__ = ["load_keyframes", "load_windows", "predict_sources"]


def load_keyframes(src: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Keyframes of ``src`` as (B, 3, size, size) float32 in [0, 1] and their times in seconds (B,).

    A video (file or camera index) goes through :func:`fedge.edge.keyframes.iter_keyframes` and the same JPEG
    decode + area resize as stored training samples (:func:`fedge.edge.store.decode_image`); a ``.npy`` array is
    taken as (B, 3, S, S) floats or (B, S, S, 3) uint8 with times 0, 1, 2, ...
    """
    if src.suffix == ".npy":
        a = np.load(src, allow_pickle=False)
        if a.ndim == 4 and a.shape[-1] == 3 and a.shape[1] != 3:  # (B, H, W, 3) images
            a = a.transpose(0, 3, 1, 2)
        if a.ndim != 4 or a.shape[1:] != (3, size, size):
            raise ValueError(f"{src}: keyframes must be (B, 3, {size}, {size}) or (B, {size}, {size}, 3), "
                             f"got {a.shape}")
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        return a, np.arange(len(a), dtype=np.float64)
    from .keyframes import iter_keyframes
    from .store import decode_image

    kfs = list(iter_keyframes(str(src)))
    if not kfs:
        raise ValueError(f"{src}: no keyframes found")
    return np.stack([decode_image(k.jpeg, size) for k in kfs]), np.array([k.time for k in kfs])


def load_windows(
    src: Path, n_mels: int, frames: int, *, centres: np.ndarray | None = None, stride_s: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel windows (B, n_mels, frames) float32 in dB and their centre times (B,).

    An audio file (or a video's audio track) is featurised with :mod:`fedge.common.media.audio` exactly as ingest does
    (16 kHz, n_fft 512, hop 256, dB per window with ``top_db`` 80); windows are centred on ``centres`` (the
    keyframe times, to pair them) or every ``stride_s`` seconds. A ``.npy`` array is taken as is.
    """
    if src.suffix == ".npy":
        a = np.load(src, allow_pickle=False)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1:] != (n_mels, frames):
            raise ValueError(f"{src}: log-mel windows must be (B, {n_mels}, {frames}), got {a.shape}")
        return a.astype(np.float32), np.arange(len(a), dtype=np.float64)
    from fedge.common.media.audio import mel_power, power_to_db
    from fedge.common.media.mel import MelParams

    from .audio_source import open_audio

    params = MelParams(n_mels=n_mels)
    source = open_audio(src, sr=params.sr)
    power = mel_power(source.read_all(), params)  # (n_mels, T)
    hop_s = params.hop / params.sr
    total = power.shape[1]
    if centres is None:
        first = (frames // 2) * hop_s
        centres = np.arange(first, max(first, total * hop_s - first) + 1e-9, stride_s)
    out = np.empty((len(centres), n_mels, frames), np.float32)
    for i, t in enumerate(centres):
        start = int(np.clip(round(t / hop_s) - frames // 2, 0, max(total - frames, 0)))
        win = power[:, start : start + frames]
        if win.shape[1] < frames:  # a clip shorter than one window: repeat its edge
            win = np.pad(win, ((0, 0), (0, frames - win.shape[1])), mode="edge")
        out[i] = power_to_db(win, ref=1.0, amin=1e-10, top_db=80.0)
    return out, np.asarray(centres, dtype=np.float64)


def predict_sources(runner: ShardedRunner, *, video: Path | None, audio: Path | None
                    ) -> tuple[Prediction, np.ndarray]:
    """Classify the keyframes of ``video`` and / or the log-mel windows of ``audio`` with ``runner``; return the
    prediction and the time in seconds of each row (B,).

    A video and an audio file (not ``.npy``) are paired: each keyframe with the audio window centred on it;
    ``.npy`` arrays are paired row by row. The rows are keyframes when a video is given, else audio windows.
    """
    spec = runner.manifest.model
    img, times = load_keyframes(video, spec["image_size"]) if video is not None else (None, None)
    aud = None
    if audio is not None:
        real_video = video is not None and video.suffix != ".npy"
        paired = times if (real_video and audio.suffix != ".npy") else None
        aud, wtimes = load_windows(audio, spec["n_mels"], spec["audio_frames"], centres=paired)
        times = times if times is not None else wtimes
    if times is None:
        raise ValueError("nothing to classify: pass a video and/or an audio source")
    return runner.predict(image=img, audio=aud), times
