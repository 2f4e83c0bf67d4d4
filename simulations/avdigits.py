"""AV digits: an audio-visual digits task from real material that ships offline, rendered as device streams.

Images are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 8x8 scans);
speech is the spoken digit from ``simulations/assets/speech`` (ten espeak-ng speakers, see
``make_speech_assets.py``). Like AV-MNIST, a sample pairs an image and an utterance of the same digit.

What a simulated device "sees" is rendered as real media files: a camera video made of shots, each shot a
handwritten digit card on a textured background under a slowly panning and zooming camera with sensor noise,
and a microphone WAV in which the digit of each shot is spoken (repeatedly, or once at a random moment:
``speech``) during that shot over noise. The edge ingest then turns these streams into samples exactly as on a
device (keyframes, log-mel, alignment, quality gate, store).

The rendering kernels are pure (they return arrays); :func:`render_device` does the file I/O. Everything is
deterministic in the seeds passed in.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.signal import resample

from fedge.common.config import MODALITIES

__all__ = [
    "ASSETS",
    "HELDOUT_ASSETS",
    "MODALITIES",
    "NOISE_COLOURS",
    "NUM_CLASSES",
    "SPEECH_MODES",
    "DevicePlan",
    "Stream",
    "augment_clip",
    "background_noise",
    "cloud_plan",
    "digit_images",
    "heldout_plan",
    "heldout_speech",
    "image_split",
    "plan_devices",
    "render_device",
    "render_shot",
    "render_track",
    "speech_clips",
    "speech_track",
    "voice_set",
    "write_video",
    "write_wav",
]

ASSETS = Path(__file__).parent / "assets" / "speech"
HELDOUT_ASSETS = ASSETS / "heldout"
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------- material
@lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float32 in [0, 1] (ink = 1) and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def image_split(seed: int, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and held-out images, stratified by digit (deterministic in ``seed``)."""
    _, y = digit_images()
    rng = np.random.default_rng([seed, 4242])
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_clips(folder: Path, names: tuple[str, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
    """clips[speaker][digit] float32 mono from ``folder/<speaker>/<digit>.wav``."""
    clips = []
    for name in names:
        row = []
        for digit in range(NUM_CLASSES):
            with wave.open(str(folder / name / f"{digit}.wav")) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            row.append(pcm.astype(np.float32) / 32768.0)
        clips.append(tuple(row))
    return tuple(clips)


@lru_cache(maxsize=1)
def speech_clips() -> tuple[tuple[str, ...], int, tuple[tuple[np.ndarray, ...], ...]]:
    """The shipped training utterances: speaker names, sample rate, clips[speaker][digit] float32 mono."""
    meta = json.loads((ASSETS / "speakers.json").read_text())
    names = tuple(s["speaker"] for s in meta["speakers"])
    return names, int(meta["rate"]), _read_clips(ASSETS, names)


@lru_cache(maxsize=1)
def heldout_speech() -> tuple[tuple[str, ...], tuple[str, ...], int, tuple[tuple[np.ndarray, ...], ...]]:
    """Speakers no simulated device or cloud share hears: names, languages, sample rate, clips[speaker][digit].

    English speakers with voices unlike any training speaker's, and speakers of other languages saying their
    language's digit words (``simulations/assets/speech/heldout``, see ``make_speech_assets.py``).
    """
    meta = json.loads((HELDOUT_ASSETS / "voices.json").read_text())
    names = tuple(s["speaker"] for s in meta["speakers"])
    langs = tuple(s["language"] for s in meta["speakers"])
    return names, langs, int(meta["rate"]), _read_clips(HELDOUT_ASSETS, names)


def voice_set(voices: str) -> tuple[tuple[str, ...], int, tuple[tuple[np.ndarray, ...], ...]]:
    """A named set of speakers: names, sample rate, clips[speaker][digit].

    ``train``: the training speakers; ``unseen``: the held-out English speakers; ``other``: every held-out speaker
    of another language; a language code (``de``, ``es``, ``fr``): the held-out speakers of that language.
    """
    if voices == "train":
        return speech_clips()
    names, langs, rate, clips = heldout_speech()
    if voices == "unseen":
        keep = [i for i, lang in enumerate(langs) if lang == "en"]
    elif voices == "other":
        keep = [i for i, lang in enumerate(langs) if lang != "en"]
    else:
        keep = [i for i, lang in enumerate(langs) if lang == voices]
    if not keep:
        known = sorted({"train", "unseen", "other", *langs})
        raise ValueError(f"unknown voice set {voices!r} (one of {', '.join(known)})")
    return tuple(names[i] for i in keep), rate, tuple(clips[i] for i in keep)


# ---------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DevicePlan:
    """What one simulated device records: the digit of each shot, its speakers and its sensors."""

    pid: int
    labels: np.ndarray  # (n,) digit shown/spoken in each shot
    images: np.ndarray  # (n,) index into digit_images() for each shot
    speakers: np.ndarray  # (n,) speaker index for each shot
    modalities: tuple[str, ...] = MODALITIES
    seed: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def plan_devices(
    num_devices: int,
    *,
    samples_per_device: int,
    seed: int,
    partition: str = "iid",
    dirichlet_alpha: float = 0.5,
    missing_image: float = 0.0,
    missing_audio: float = 0.0,
) -> list[DevicePlan]:
    """Split the training material over devices.

    ``partition``: ``iid`` (labels and speakers uniform), ``dirichlet`` (each device's label mix drawn from
    Dir(alpha), speakers uniform) or ``speaker`` (device i hears only speaker i mod #speakers, labels uniform).
    Missing modalities: an exact fraction of the devices (after a seeded shuffle) has no camera, another none
    microphone (the same rule as :func:`fedge.common.synthetic.device_partition`).
    """
    from fedge.common.synthetic import device_partition

    if partition not in ("iid", "dirichlet", "speaker"):
        raise ValueError(f"unknown partition {partition!r}")
    _, y = digit_images()
    train_idx, _ = image_split(seed)
    by_class = [train_idx[y[train_idx] == c] for c in range(NUM_CLASSES)]
    n_speakers = len(speech_clips()[0])
    plans = []
    for pid in range(num_devices):
        probs, mods = device_partition(
            pid, num_devices, seed=seed, samples=samples_per_device, num_classes=NUM_CLASSES,
            partition="dirichlet" if partition == "dirichlet" else "iid", dirichlet_alpha=dirichlet_alpha,
            missing_image=missing_image, missing_audio=missing_audio,
        )
        rng = np.random.default_rng([seed, 31, pid])
        p = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES) if probs is None else probs
        labels = rng.choice(NUM_CLASSES, size=samples_per_device, p=p / p.sum()).astype(np.int64)
        images = np.array([rng.choice(by_class[c]) for c in labels], dtype=np.int64)
        if partition == "speaker":
            speakers = np.full(samples_per_device, pid % n_speakers, dtype=np.int64)
        else:
            speakers = rng.integers(0, n_speakers, size=samples_per_device).astype(np.int64)
        plans.append(DevicePlan(pid=pid, labels=labels, images=images, speakers=speakers, modalities=mods,
                                seed=int(rng.integers(2**31))))
    return plans


def cloud_plan(samples: int, *, seed: int, devices: list[DevicePlan]) -> DevicePlan:
    """The cloud's curated, labelled share (pid -2): training images no device records (never held-out ones).

    Labels are balanced; where the devices already use every training image of a digit, the cloud falls back to
    that digit's training images (its own speakers' takes and augmentation still differ).
    """
    _, y = digit_images()
    train_idx, _ = image_split(seed)
    used = set(np.concatenate([p.images for p in devices]).tolist()) if devices else set()
    rng = np.random.default_rng([seed, 1601])
    labels = np.arange(samples, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    by_class = []
    for c in range(NUM_CLASSES):
        cls = train_idx[y[train_idx] == c]
        free = np.array([i for i in cls if int(i) not in used], dtype=np.int64)
        by_class.append(free if len(free) else cls)
    images = np.array([rng.choice(by_class[c]) for c in labels], dtype=np.int64)
    speakers = rng.integers(0, len(speech_clips()[0]), size=samples).astype(np.int64)
    return DevicePlan(pid=-2, labels=labels, images=images, speakers=speakers, seed=int(rng.integers(2**31)))


def heldout_plan(samples: int, *, seed: int, voices: str = "train") -> DevicePlan:
    """A held-out 'device' with both sensors: unseen images, every speaker of ``voices``, fresh augmentation.

    ``voices`` names the speaker set (:func:`voice_set`); the labels and images depend on ``seed`` and
    ``samples`` only, so held-out devices of several voice sets show the same images.
    """
    _, y = digit_images()
    _, test_idx = image_split(seed)
    rng = np.random.default_rng([seed, 977])
    labels = np.arange(samples, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    by_class = [test_idx[y[test_idx] == c] for c in range(NUM_CLASSES)]
    images = np.array([rng.choice(by_class[c]) for c in labels], dtype=np.int64)
    speakers = rng.integers(0, len(voice_set(voices)[0]), size=samples).astype(np.int64)
    return DevicePlan(pid=-1, labels=labels, images=images, speakers=speakers, seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------------------- kernels
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background (size, size, 3) uint8: a colour plus low-frequency blotches."""
    import cv2

    base = rng.uniform(40, 180) + rng.uniform(-25, 25, size=3)  # muted colours
    blot = cv2.resize(rng.uniform(-50, 50, size=(4, 4, 3)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base + blot, 0, 255).astype(np.uint8)


def render_shot(image: np.ndarray, frames: int, *, size: int, noise: float,
                rng: np.random.Generator, card_fraction: tuple[float, float] = (0.85, 0.95)) -> np.ndarray:
    """One shot: (frames, size, size, 3) uint8 BGR frames of a digit card under a moving camera.

    The card (dark ink on paper, a side of ``card_fraction`` of the frame's, by default 85-95%: the camera
    frames the digit) sits on a textured background; the camera pans and zooms slowly (a few pixels over the
    shot) and every frame gets Gaussian sensor noise of ``noise`` (0-1).
    """
    import cv2

    canvas = 2 * size
    bg = _background(rng, canvas)
    card = int(size * rng.uniform(*card_fraction))
    ink = cv2.resize(image, (card, card), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    paper = rng.uniform(200, 250)
    tint = rng.uniform(0.85, 1.0, size=3)
    card_img = (paper * (1 - 0.85 * ink))[..., None] * tint
    cy, cx = canvas // 2 - card // 2 + rng.integers(-4, 5, size=2)
    bg[cy:cy + card, cx:cx + card] = card_img.astype(np.uint8)
    gain = rng.uniform(0.75, 1.15)
    # camera: centred on the card, drifting by up to ~5% of the frame, zoom 1.0 -> 1.0+-0.06 over the shot
    start = rng.uniform(-0.03, 0.03, size=2) * size
    drift = rng.uniform(-0.05, 0.05, size=2) * size
    z0, z1 = 1.0, 1.0 + rng.uniform(-0.06, 0.06)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        z = z0 + (z1 - z0) * t
        c = np.array([canvas / 2, canvas / 2]) + start + drift * t
        # map output pixel (u, v) to canvas (c + (u - size/2) / z)
        m = np.array([[1 / z, 0, c[1] - size / (2 * z)], [0, 1 / z, c[0] - size / (2 * z)]], dtype=np.float32)
        fr = cv2.warpAffine(bg, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT)
        fr = fr.astype(np.float32) * gain + rng.normal(0, noise * 255, size=fr.shape)
        out[f] = np.clip(fr, 0, 255).astype(np.uint8)
    return out


def augment_clip(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new take of an utterance: speed +-8% (resampled), gain 0.5-1.0."""
    factor = rng.uniform(0.92, 1.08)
    x = resample(clip, max(8, round(len(clip) / factor))).astype(np.float32)
    return x * rng.uniform(0.5, 1.0)


SPEECH_MODES = ("fill", "once")
NOISE_COLOURS = ("white", "pink")


def speech_track(takes: list[list[np.ndarray]], *, rate: int, shot_s: float, rng: np.random.Generator,
                 speech: str = "fill") -> tuple[np.ndarray, list[tuple[int, int]], float]:
    """The speech of a microphone track, without noise: (samples, (start, end) sample span of every take
    placed, mean power of the takes).

    ``speech="fill"``: during shot i its digit is spoken over and over (``takes[i]``): the takes follow one
    another with 50-150 ms pauses from a random start in the first 100 ms; a take that would run past the
    shot's end is left out (at least the first is kept, cut at the end), so any audio window around a keyframe
    of the shot hears that shot's digit. ``speech="once"``: the first take of each shot, once, at a uniformly
    random offset that keeps it inside the shot (cut at the end when longer than the shot), as people speak.
    """
    if speech not in SPEECH_MODES:
        raise ValueError(f"speech must be one of {', '.join(SPEECH_MODES)}, got {speech!r}")
    shot = round(shot_s * rate)
    y = np.zeros(shot * len(takes), dtype=np.float32)
    power, spans = [], []
    for i, shot_takes in enumerate(takes):
        if speech == "once":
            pos = int(rng.uniform(0.0, max(0, shot - len(shot_takes[0])))) if shot_takes else shot
        else:
            pos = int(rng.uniform(0.0, 0.1) * rate)
        for j, c in enumerate(shot_takes):
            if pos + len(c) > shot and j > 0:
                break
            c = c[: shot - pos]
            y[i * shot + pos: i * shot + pos + len(c)] += c
            power.append(float(np.mean(c**2)))
            spans.append((i * shot + pos, i * shot + pos + len(c)))
            pos += len(c) + int(rng.uniform(0.05, 0.15) * rate)
            if pos >= shot or speech == "once":
                break
    return y, spans, float(np.mean(power)) if power else 1e-4


def background_noise(n: int, *, power: float, colour: str, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of Gaussian noise of mean ``power``: white, or pink (power falling as 1/f)."""
    if colour not in NOISE_COLOURS:
        raise ValueError(f"noise colour must be one of {', '.join(NOISE_COLOURS)}, got {colour!r}")
    if colour == "white":
        return rng.normal(0, np.sqrt(power), size=n).astype(np.float32)
    spec = np.fft.rfft(rng.normal(size=n))
    spec /= np.sqrt(np.maximum(np.arange(spec.size), 1.0))  # amplitude 1/sqrt(f): power 1/f
    x = np.fft.irfft(spec, n)
    return (x * np.sqrt(power) / max(float(x.std()), 1e-12)).astype(np.float32)


def render_track(takes: list[list[np.ndarray]], *, rate: int, shot_s: float, snr_db: float,
                 rng: np.random.Generator, speech: str = "fill", noise: str = "white") -> np.ndarray:
    """A microphone track: the speech of :func:`speech_track` over ``noise`` (white or pink) at ``snr_db``
    below the mean speech power. Returns float32 mono samples in [-1, 1], ``len(takes) * shot_s`` seconds
    long."""
    y, _, power = speech_track(takes, rate=rate, shot_s=shot_s, rng=rng, speech=speech)
    y += background_noise(y.size, power=power / (10 ** (snr_db / 10)), colour=noise, rng=rng)
    return np.clip(y, -1, 1)


# ---------------------------------------------------------------------------------------------- files
def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write BGR uint8 frames (T, H, W, 3) as an MJPG AVI (decodable by any OpenCV build)."""
    import cv2

    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not vw.isOpened():
        raise OSError(f"cannot open a video writer for {path}")
    for f in frames:
        vw.write(f)
    vw.release()


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    """Write float samples in [-1, 1] as a 16-bit PCM mono WAV."""
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


@dataclass(frozen=True)
class Stream:
    """One rendered recording of a device: its files and the digit it shows/speaks throughout."""

    label: int
    shots: int
    video: Path | None
    audio: Path | None


def render_device(plan: DevicePlan, out_dir: Path, *, fps: float, shot_s: float, size: int,
                  image_noise: float, snr_db: float, voices: str = "train", speech: str = "fill",
                  snr_db_spread: float = 0.0) -> list[Stream]:
    """Render one device's streams into ``out_dir``: one video/WAV pair per digit it records.

    A camera-only device gets no WAV and a microphone-only device no video. Each stream holds all the
    device's shots of one digit, so the ingest can label the samples it produces with ``--label``.
    ``plan.speakers`` index the speakers of ``voices`` (:func:`voice_set`). ``speech``: the digit is spoken
    through each shot (``"fill"``) or once at a random moment of it (``"once"``, see :func:`speech_track`).
    Each WAV's speech-to-noise ratio is drawn uniformly from ``[snr_db, snr_db + snr_db_spread]``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    imgs, _ = digit_images()
    _, rate, clips = voice_set(voices)
    rng = np.random.default_rng(plan.seed)
    frames_per_shot = max(2, round(shot_s * fps))
    streams = []
    for label in sorted(set(plan.labels.tolist())):
        rows = np.flatnonzero(plan.labels == label)
        video = audio = None
        if "image" in plan.modalities:
            frames = np.concatenate([render_shot(imgs[plan.images[i]], frames_per_shot, size=size,
                                                 noise=image_noise, rng=rng) for i in rows])
            video = out_dir / f"cam-{label}.avi"
            write_video(video, frames, fps)
        if "audio" in plan.modalities:
            shot_len = frames_per_shot / fps
            n_takes = 1 if speech == "once" else int(np.ceil(shot_len / 0.3)) + 1  # the shortest clip is ~0.3 s
            takes = [[augment_clip(clips[plan.speakers[i]][label], rng) for _ in range(n_takes)] for i in rows]
            audio = out_dir / f"mic-{label}.wav"
            snr = snr_db + float(rng.uniform(0.0, snr_db_spread)) if snr_db_spread > 0 else snr_db
            write_wav(audio, render_track(takes, rate=rate, shot_s=shot_len, snr_db=snr, rng=rng,
                                          speech=speech), rate)
        streams.append(Stream(label=int(label), shots=len(rows), video=video, audio=audio))
    return streams
