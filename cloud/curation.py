"""Cloud data curation on Ray Data: the edge's data path at cluster scale, feeding the global trainer.

Input rows are raw clips (``clip_id``, ``label``, ``frames`` (T, H, W, 3) BGR uint8 at ``fps``, ``audio``
(n,) float waveform at ``sr``; an empty array for a modality the clip lacks). Each stage is a ``ray.data``
transform over pure kernels from ``common/media`` (the very ones the devices run):

1. ``detect``: modality detection: which streams a clip carries and whether they are usable (shape, dtype,
   finite, long enough); unusable streams are dropped with a counted reason.
2. ``extract``: per-modality processing and alignment, one clip -> several samples. Shots are found with
   :func:`fedge.common.media.shots.detect_boundaries`; the middle frame of each shot is its keyframe (resized to the
   model's ``image_size``). The audio is featurised once with :func:`fedge.common.media.audio.mel_power` and each
   keyframe at time ``t`` gets the ``audio_frames`` log-mel window centred at ``t`` (dB per window, as on the
   edge). An audio-only clip yields windows every ``audio_stride_s``; a video-only clip image-only samples.
3. ``assess``: quality scores in [0, 1] per modality (:mod:`fedge.common.media.quality`: sharpness and exposure of
   the keyframe; level and clipping of the raw samples the window covers).
4. ``accept_or_clean``: a modality scoring at least ``min_quality`` is accepted; an under- or over-exposed
   but sharp keyframe is cleaned (percentile contrast stretch) and re-scored; a modality still below the bar
   is removed from the sample (mask False) and a sample with no modality left is rejected. Every decision is
   kept in a ``status`` column so that :func:`curation_report` can count them.

The output columns are the trainer's layout (``image`` (3, S, S) float32 in [0, 1], ``audio`` (n_mels, T)
dB, ``label``, ``mask`` (2,), ``quality`` (2,)) plus ``status`` and ``clip_id``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import cv2
import numpy as np

from fedge.common.config import MODALITIES, FedgeConfig
from fedge.common.media.audio import mel_power, power_to_db
from fedge.common.media.mel import MelParams, hz_to_mel, mel_to_hz
from fedge.common.media.quality import audio_score, audio_stats, image_score, image_stats
from fedge.common.media.shots import detect_boundaries

Row = dict[str, Any]
_IMG, _AUD = MODALITIES.index("image"), MODALITIES.index("audio")


@dataclass(frozen=True)
class CurationParams:
    """Shapes and thresholds of the curation pipeline (flat; built from the run config by entry points)."""

    image_size: int = 32
    n_mels: int = 40
    audio_frames: int = 32
    sr: int = 16000
    min_quality: float = 0.3
    audio_stride_s: float = 1.0
    max_keyframes: int = 4  # per clip

    def __post_init__(self) -> None:
        for k in ("image_size", "n_mels", "audio_frames", "sr", "max_keyframes"):
            if getattr(self, k) < 1:
                raise ValueError(f"curation parameter '{k}': must be >= 1")
        if not 0.0 <= self.min_quality <= 1.0:
            raise ValueError("curation parameter 'min_quality': must be in [0, 1]")
        if self.audio_stride_s <= 0:
            raise ValueError("curation parameter 'audio_stride_s': must be > 0")

    @property
    def mel(self) -> MelParams:
        return MelParams(sr=self.sr, n_mels=self.n_mels)


def params_from_config(cfg: FedgeConfig) -> CurationParams:
    """Curation parameters that match the model of ``cfg``."""
    m = cfg.model
    return CurationParams(image_size=m.image_size, n_mels=m.n_mels, audio_frames=m.audio_frames)


# ---------------------------------------------------------------------------------------------- stages
def detect(row: Row) -> Row:
    """Stage 1: which modalities the clip carries in usable form; drop the others with a reason."""
    out = dict(row)
    reasons: list[str] = []
    frames = np.asarray(row.get("frames", np.zeros((0,), np.uint8)))
    has_video = frames.size > 0
    if has_video and (frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8):
        reasons.append(f"image:bad-frames{tuple(frames.shape)}")
        has_video = False
    if has_video and (float(row.get("fps", 0.0)) <= 0 or frames.shape[1] < 8 or frames.shape[2] < 8):
        reasons.append("image:bad-fps-or-size")
        has_video = False
    audio = np.asarray(row.get("audio", np.zeros((0,), np.float32)))
    has_audio = audio.size > 0
    if has_audio and (audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating)):
        reasons.append(f"audio:bad-waveform{tuple(audio.shape)}")
        has_audio = False
    if has_audio and not bool(np.isfinite(audio).all()):
        reasons.append("audio:non-finite")
        has_audio = False
    if has_audio and int(row.get("sr", 0)) <= 0:
        reasons.append("audio:bad-sr")
        has_audio = False
    out["has_video"], out["has_audio"] = has_video, has_audio
    out["detect_notes"] = ";".join(reasons)
    return out


def _keyframe_times(frames: np.ndarray, fps: float, max_keyframes: int) -> list[int]:
    """Frame index of the middle of each detected shot (at most ``max_keyframes``, spread over the clip)."""
    bounds = [b.frame for b in detect_boundaries(list(enumerate(frames)), fps)]
    edges = [0, *sorted(b for b in bounds if 0 < b < len(frames)), len(frames)]
    mids = [(a + b) // 2 for a, b in pairwise(edges) if b > a]
    if len(mids) > max_keyframes:
        mids = [mids[i] for i in np.linspace(0, len(mids) - 1, max_keyframes).round().astype(int)]
    return mids


def _audio_window(power: np.ndarray, y: np.ndarray, t: float, p: CurationParams) -> tuple[np.ndarray, np.ndarray]:
    """(dB window (n_mels, frames), raw samples it covers) centred at ``t`` seconds, clamped to the clip."""
    mel = p.mel
    total = power.shape[1]
    centre = round(t * p.sr / mel.hop)
    start = int(np.clip(centre - p.audio_frames // 2, 0, max(total - p.audio_frames, 0)))
    win = power[:, start : start + p.audio_frames]
    if win.shape[1] < p.audio_frames:  # a clip shorter than one window: repeat its edge
        win = np.pad(win, ((0, 0), (0, p.audio_frames - win.shape[1])), mode="edge")
    s0, s1 = start * mel.hop, (start + p.audio_frames) * mel.hop
    return power_to_db(win, ref=1.0, top_db=80.0).astype(np.float32), y[s0:s1]


def _resize(frame_bgr: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(frame_bgr, (size, size), interpolation=cv2.INTER_AREA)


def extract(row: Row, p: CurationParams) -> Iterator[Row]:
    """Stage 2: keyframes per shot and the log-mel window aligned to each (one clip -> samples)."""
    base = {"clip_id": str(row["clip_id"]), "label": int(row["label"]), "notes": row["detect_notes"]}
    power: np.ndarray | None = None
    y: np.ndarray | None = None
    if row["has_audio"]:
        y = np.asarray(row["audio"], dtype=np.float32)
        if int(row["sr"]) != p.sr:
            y = cv2.resize(y.reshape(1, -1), (round(len(y) * p.sr / int(row["sr"])), 1),
                           interpolation=cv2.INTER_LINEAR).ravel()
        if p.mel.n_frames(len(y)) > 0:
            power = mel_power(y, p.mel)
        else:
            base["notes"] += ";audio:too-short"
    empty_img = np.zeros((p.image_size, p.image_size, 3), np.uint8)
    empty_aud = np.zeros((p.n_mels, p.audio_frames), np.float32)
    if row["has_video"]:
        frames = np.asarray(row["frames"])
        fps = float(row["fps"])
        for k in _keyframe_times(frames, fps, p.max_keyframes):
            sample = dict(base, keyframe=_resize(frames[k], p.image_size), time=k / fps, has_image=True)
            if power is not None:
                db, raw = _audio_window(power, y, k / fps, p)  # type: ignore[arg-type]
                sample.update(audio=db, audio_raw_rms=audio_stats(raw).rms_dbfs,
                              audio_clip=audio_stats(raw).clip_fraction, has_audio_=True)
            else:
                sample.update(audio=empty_aud, audio_raw_rms=float("-inf"), audio_clip=0.0, has_audio_=False)
            yield sample
    elif power is not None:
        dur = len(y) / p.sr  # type: ignore[arg-type]
        half = p.audio_frames * p.mel.hop / p.sr / 2
        for t in np.arange(half, max(dur - half, half) + 1e-9, p.audio_stride_s):
            db, raw = _audio_window(power, y, float(t), p)  # type: ignore[arg-type]
            st = audio_stats(raw)
            yield dict(base, keyframe=empty_img, time=float(t), has_image=False, audio=db,
                       audio_raw_rms=st.rms_dbfs, audio_clip=st.clip_fraction, has_audio_=True)
    else:
        yield dict(base, keyframe=empty_img, time=0.0, has_image=False, audio=empty_aud,
                   audio_raw_rms=float("-inf"), audio_clip=0.0, has_audio_=False)


def _image_quality(bgr: np.ndarray) -> float:
    return image_score(image_stats(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))


def _audio_quality(rms_dbfs: float, clip: float) -> float:
    from fedge.common.media.quality import AudioStats

    return audio_score(AudioStats(rms_dbfs=float(rms_dbfs), peak=0.0, clip_fraction=float(clip)))


def assess(row: Row) -> Row:
    """Stage 3: quality per modality in [0, 1] (0 for an absent one)."""
    out = dict(row)
    out["q_image"] = _image_quality(row["keyframe"]) if row["has_image"] else 0.0
    out["q_audio"] = _audio_quality(row["audio_raw_rms"], row["audio_clip"]) if row["has_audio_"] else 0.0
    return out


def stretch_contrast(bgr: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Cleaning for a badly exposed keyframe: map the [lo, hi] percentiles of each channel to [0, 255]."""
    x = bgr.astype(np.float32)
    lo = np.percentile(x, lo_pct, axis=(0, 1), keepdims=True)
    hi = np.percentile(x, hi_pct, axis=(0, 1), keepdims=True)
    return np.clip((x - lo) * 255.0 / np.maximum(hi - lo, 1.0), 0, 255).astype(np.uint8)


def accept_or_clean(row: Row, p: CurationParams) -> Row:
    """Stage 4: accept, clean (re-expose and re-score a keyframe) or remove each modality; to model layout."""
    status: list[str] = []
    keyframe, q_img, q_aud = row["keyframe"], float(row["q_image"]), float(row["q_audio"])
    has_img, has_aud = bool(row["has_image"]), bool(row["has_audio_"])
    if has_img and q_img < p.min_quality:
        cleaned = stretch_contrast(keyframe)
        q_new = _image_quality(cleaned)
        if q_new >= p.min_quality:
            keyframe, q_img = cleaned, q_new
            status.append("image:cleaned")
        else:
            has_img = False
            status.append("image:removed-low-quality")
    if has_aud and q_aud < p.min_quality:
        has_aud = False
        status.append("audio:removed-low-quality")
    if not (has_img or has_aud):
        status = ["rejected"]
    elif not status:
        status = ["accepted"]
    notes = [n for n in str(row["notes"]).split(";") if n]
    rgb = cv2.cvtColor(keyframe, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    mask = np.zeros(len(MODALITIES), bool)
    mask[_IMG], mask[_AUD] = has_img, has_aud
    quality = np.zeros(len(MODALITIES), np.float32)
    quality[_IMG], quality[_AUD] = q_img if has_img else 0.0, q_aud if has_aud else 0.0
    return {
        "clip_id": row["clip_id"], "label": np.int64(row["label"]),
        "image": np.ascontiguousarray(rgb.transpose(2, 0, 1)), "audio": np.asarray(row["audio"], np.float32),
        "mask": mask, "quality": quality, "status": ";".join(notes + status),
    }


def curate(raw: Any, p: CurationParams = CurationParams(), *, keep_rejected: bool = False) -> Any:
    """The whole pipeline as lazy ``ray.data`` transforms over a dataset of raw clips.

    Returns a ``ray.data.Dataset`` with the trainer's columns plus ``status`` and ``clip_id``; rejected
    samples are filtered out unless ``keep_rejected`` (to count them, see :func:`curation_report`).
    """
    ds = (raw.map(detect)
          .flat_map(extract, fn_kwargs={"p": p})
          .map(assess)
          .map(accept_or_clean, fn_kwargs={"p": p}))
    if not keep_rejected:
        ds = ds.filter(lambda r: not str(r["status"]).endswith("rejected"))
    return ds


def curation_report(curated: Any) -> dict[str, int]:
    """Counts of every decision in a curated dataset's ``status`` column (``accepted``, ``image:cleaned``...)."""
    counts: Counter[str] = Counter()
    for batch in curated.select_columns(["status"]).iter_batches(batch_size=4096, batch_format="numpy"):
        for s in batch["status"]:
            counts.update(x for x in str(s).split(";") if x)
    counts["samples"] = int(curated.count())
    return dict(counts)


def training_columns(curated: Any) -> Any:
    """Only the columns the trainer reads."""
    return curated.select_columns(["image", "audio", "label", "mask", "quality"])


# ---------------------------------------------------------------------------------------------- raw data
def synthetic_clips(n: int, *, seed: int, p: CurationParams = CurationParams(), num_classes: int = 10,
                    seconds: float = 3.0, fps: float = 8.0, frame_size: int = 64, proto_seed: int = 1234,
                    corrupt: float = 0.0) -> list[Row]:
    """Raw audio-visual clips of the generated task (common/synthetic.py's class prototypes), for the cloud.

    A clip of class c: two shots of the class's visual prototype (shifted, noisy, a hard cut between them,
    the second one mirrored so the cut is visible) and a waveform whose energy sits in the class's two mel
    bands, modulated at the class's rate, plus white noise. With ``corrupt`` > 0 that fraction of clips gets
    one of: a dark video (cleanable), a lens-cap video (no image), a near-silent microphone (no audio), or
    both at once (rejected); the kind is written into ``clip_id``.
    """
    from fedge.common.synthetic import _prototypes  # the same class prototypes as the devices' generated data

    rng = np.random.default_rng(seed)
    img_p, bands, rates = _prototypes(num_classes, frame_size, p.n_mels, p.audio_frames, proto_seed)
    mel = p.mel
    centres = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(p.sr / 2), p.n_mels + 2))[1:-1]
    n_frames, n_samples = int(seconds * fps), int(seconds * p.sr)
    t = np.arange(n_samples) / p.sr
    kinds = ("dark", "lenscap", "silent", "both")
    clips: list[Row] = []
    for i in range(n):
        c = int(rng.integers(num_classes))
        proto = (img_p[c].transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.float32)  # RGB -> BGR, 0..255
        frames = np.empty((n_frames, frame_size, frame_size, 3), np.float32)
        cut = n_frames // 2 + int(rng.integers(-2, 3))
        for s, (a, b) in enumerate(((0, cut), (cut, n_frames))):
            shot = np.roll(proto, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
            if s == 1:
                shot = shot[:, ::-1]
            for f in range(a, b):
                frames[f] = np.roll(shot, (0, f - a), axis=(0, 1)) + rng.normal(0, 6, shot.shape)
        env = 0.6 + 0.4 * np.sin(2 * np.pi * rates[c] * t / (p.audio_frames * mel.hop / p.sr) +
                                 rng.uniform(0, 2 * np.pi))
        y = sum(np.sin(2 * np.pi * centres[min(int(bands[c, j]), p.n_mels - 1)] * t + rng.uniform(0, 6.3))
                for j in range(2))
        y = 0.2 * env * y + rng.normal(0, 0.03, n_samples)
        kind = kinds[int(rng.integers(len(kinds)))] if rng.random() < corrupt else "clean"
        if kind in ("dark", "both"):
            frames = frames * 0.05
        if kind == "lenscap":
            frames = np.full_like(frames, 3.0)
        if kind in ("silent", "both"):
            y = y * 1e-4
        if kind == "both":
            frames = np.full_like(frames, 3.0)
        clips.append({
            "clip_id": f"clip-{seed}-{i}-{kind}", "label": c,
            "frames": np.clip(frames, 0, 255).astype(np.uint8), "fps": fps,
            "audio": y.astype(np.float32), "sr": p.sr,
        })
    return clips


def cloud_dataset(cfg: FedgeConfig, *, seed: int | None = None, corrupt: float = 0.1) -> Any:
    """The cloud's own training data: ``training.samples`` samples' worth of generated clips, curated.

    Ray must be initialised. Returns the trainer's columns, materialised (the trainer reads it once per
    worker and per restart).
    """
    import ray

    p = params_from_config(cfg)
    n_clips = max(1, -(-cfg.training.samples // 2))  # two shots per clip -> about two samples
    clips = synthetic_clips(n_clips, seed=cfg.seed * 7 + 5 if seed is None else seed, p=p,
                            num_classes=cfg.model.num_classes, corrupt=corrupt, seconds=2.0, fps=6.0)
    return training_columns(curate(ray.data.from_items(clips), p)).materialize()


__all__ = [
    "CurationParams", "accept_or_clean", "assess", "cloud_dataset", "curate", "curation_report", "detect",
    "extract", "params_from_config", "stretch_contrast", "synthetic_clips", "training_columns",
]
