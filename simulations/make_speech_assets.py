"""Generate the spoken-digit WAVs shipped in ``simulations/assets/speech/`` (run once; needs espeak-ng).

Each "speaker" is an espeak-ng voice with its own variant, pitch and speed. For every speaker and digit it
synthesizes the English number word, resamples to 16 kHz mono, trims leading/trailing silence, normalizes the
peak and writes ``speech/<speaker>/<digit>.wav`` (16-bit PCM) plus ``speech/speakers.json`` (what made each voice).

Usage (Debian/Ubuntu: ``apt-get install -y espeak-ng``)::

    .venv/bin/python simulations/make_speech_assets.py            # rewrites simulations/assets/speech/

The WAVs are committed, so neither CI nor a fresh machine needs espeak-ng; rerun only to change the set.
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

from simulations.avdigits import write_wav

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
DEFAULT_OUT = Path(__file__).parent / "assets" / "speech"


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


def main() -> None:
    """Regenerate the speech assets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (replaced)")
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("make_speech_assets: espeak-ng not found (apt-get install -y espeak-ng)")
    if args.out.exists():
        shutil.rmtree(args.out)
    meta = []
    for name, voice, pitch, speed in SPEAKERS:
        for digit, word in enumerate(WORDS):
            (args.out / name).mkdir(parents=True, exist_ok=True)
            write_wav(args.out / name / f"{digit}.wav", synthesize(word, voice, pitch, speed), RATE)
        meta.append({"speaker": name, "voice": voice, "pitch": pitch, "speed_wpm": speed})
    (args.out / "speakers.json").write_text(json.dumps({"rate": RATE, "words": WORDS, "speakers": meta}, indent=1))
    total = sum(p.stat().st_size for p in args.out.rglob("*.wav"))
    print(f"wrote {len(SPEAKERS) * len(WORDS)} WAVs, {total / 1e6:.2f} MB, to {args.out}")


if __name__ == "__main__":
    main()
