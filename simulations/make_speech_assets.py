"""Generate the spoken-digit WAVs shipped in ``simulations/assets/speech/`` (run once; needs espeak-ng).

Each "speaker" is an espeak-ng voice with its own variant, pitch and speed. For every speaker and digit it
synthesizes the number word, resamples to 16 kHz mono, trims leading/trailing silence, normalizes the peak and
writes a 16-bit PCM WAV. Two sets:

- training speakers (``--set train``): English, ``speech/<speaker>/<digit>.wav`` plus ``speech/speakers.json``;
  simulated devices and the cloud hear only these;
- held-out speakers (``--set heldout``): voices no device has, ``speech/heldout/<speaker>/<digit>.wav`` plus
  ``speech/heldout/voices.json``: English speakers built from espeak-ng variants, pitches and speeds that no
  training speaker uses, and German, Spanish and French speakers saying the digit words of their language (audio
  the model was never trained on, for the speaker-split learning benchmark).

Usage (Debian/Ubuntu: ``apt-get install -y espeak-ng``)::

    .venv/bin/python simulations/make_speech_assets.py --set all   # rewrites simulations/assets/speech/

The WAVs are committed, so neither CI nor a fresh machine needs espeak-ng; rerun only to change a set.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from fedge.simulations.avdigits import write_wav

__all__ = [
    "DEFAULT_OUT",
    "HELDOUT",
    "HELDOUT_DIR",
    "HELDOUT_WORDS",
    "RATE",
    "SPEAKERS",
    "WORDS",
    "main",
    "synthesize",
    "write_heldout",
    "write_training",
]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RATE = 16_000
# (name, espeak-ng voice[+variant], pitch 0-99, speed words/min): ten clearly different speakers
SPEAKERS: tuple[tuple[str, str, int, int], ...] = (
    ("s00", "en-us", 50, 160),
    ("s01", "en-gb+f3", 60, 150),
    ("s02", "en-gb-scotland+m3", 35, 140),
    ("s03", "en-us+f2", 70, 175),
    ("s04", "en-gb-x-rp+m7", 40, 130),
    ("s05", "en-029+f4", 55, 165),
    ("s06", "en-us-nyc+m1", 25, 185),
    ("s07", "en-gb-x-gbclan+f1", 75, 145),
    ("s08", "en-gb-x-gbcwmd+m4", 45, 170),
    ("s09", "en-us+klatt", 60, 155),
)
# Held-out speakers: (name, language, espeak-ng voice[+variant], pitch, speed). The English ones use variants
# (m2, m5, m6, m8, f5, klatt3) and pitch/speed pairs that no training speaker has; the others speak their own
# language's digit words.
HELDOUT: tuple[tuple[str, str, str, int, int], ...] = (
    ("u00", "en", "en-us+m2", 45, 150),
    ("u01", "en", "en-gb+f5", 65, 160),
    ("u02", "en", "en-gb-x-rp+m6", 30, 170),
    ("u03", "en", "en-029+m5", 52, 135),
    ("u04", "en", "en-us-nyc+klatt3", 58, 180),
    ("u05", "en", "en-gb-scotland+m8", 38, 158),
    ("g00", "de", "de+m2", 48, 150),
    ("g01", "de", "de+f5", 68, 165),
    ("e00", "es", "es+m6", 40, 160),
    ("e01", "es", "es-419+f5", 62, 150),
    ("f00", "fr", "fr-fr+m5", 45, 155),
    ("f01", "fr", "fr-fr+f5", 70, 165),
)
HELDOUT_WORDS: dict[str, tuple[str, ...]] = {
    "en": WORDS,
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
}
DEFAULT_OUT = Path(__file__).parent / "assets" / "speech"
HELDOUT_DIR = "heldout"


def synthesize(word: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """One utterance as float32 mono at :data:`RATE`, silence trimmed, peak 0.9."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", word],
        check=True, capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    x = resample_poly(x, RATE, sr).astype(np.float32)  # 22050 -> 16000
    # trim: keep from the first to the last 10 ms frame whose RMS is within 35 dB of the loudest frame
    frame = RATE // 100
    n = len(x) // frame
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > -35.0)
    x = x[max(0, (loud[0] - 1) * frame): (loud[-1] + 2) * frame]
    return (0.9 * x / max(float(np.abs(x).max()), 1e-6)).astype(np.float32)


def _write_speaker(folder: Path, words: tuple[str, ...], voice: str, pitch: int, speed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for digit, word in enumerate(words):
        write_wav(folder / f"{digit}.wav", synthesize(word, voice, pitch, speed), RATE)


def write_training(out: Path) -> int:
    """The training speakers into ``out`` (their folders and ``speakers.json`` replaced); returns the WAV count."""
    meta = []
    for name, voice, pitch, speed in SPEAKERS:
        shutil.rmtree(out / name, ignore_errors=True)
        _write_speaker(out / name, WORDS, voice, pitch, speed)
        meta.append({"speaker": name, "voice": voice, "pitch": pitch, "speed_wpm": speed})
    (out / "speakers.json").write_text(json.dumps({"rate": RATE, "words": WORDS, "speakers": meta}, indent=1))
    return len(SPEAKERS) * len(WORDS)


def write_heldout(out: Path) -> int:
    """The held-out speakers into ``out/heldout`` (replaced); returns the WAV count."""
    root = out / HELDOUT_DIR
    shutil.rmtree(root, ignore_errors=True)
    meta = []
    for name, lang, voice, pitch, speed in HELDOUT:
        _write_speaker(root / name, HELDOUT_WORDS[lang], voice, pitch, speed)
        meta.append({"speaker": name, "language": lang, "voice": voice, "pitch": pitch, "speed_wpm": speed,
                     "words": HELDOUT_WORDS[lang]})
    (root / "voices.json").write_text(json.dumps({"rate": RATE, "speakers": meta}, indent=1, ensure_ascii=False))
    return len(HELDOUT) * len(WORDS)


def main() -> None:
    """Regenerate the speech assets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the speech assets folder")
    ap.add_argument("--set", dest="which", choices=("train", "heldout", "all"), default="all",
                    help="which speakers to (re)generate: training, held-out or both")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_speech_assets: espeak-ng not found (apt-get install -y espeak-ng)")
    args.out.mkdir(parents=True, exist_ok=True)
    n = 0
    if args.which in ("train", "all"):
        n += write_training(args.out)
    if args.which in ("heldout", "all"):
        n += write_heldout(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*.wav"))
    print(f"wrote {n} WAVs; the folder holds {total / 1e6:.2f} MB of WAVs, in {args.out}")


if __name__ == "__main__":
    main()
