"""Audio-video alignment: does a shot's sample keep the speech of its shot? Shot-level alignment against the
keyframe-centred window, in the same run on the same recordings.

Recordings: camera+microphone streams of AV-digits shots (``fedge.simulations.avdigits``: a handwritten digit card
under a moving camera; shot lengths drawn from ``--min-shot``..``--max-shot`` seconds), in which each shot's digit
is spoken once at a uniformly random moment of the shot (``speech_track(speech="once")``), over background
noise: for every seed, one recording per noise condition (white noise at 30, 20 and 10 dB SNR, pink noise at 20,
15 and 10 dB; SNR against the mean power of the utterances). Each recording is ingested twice by
``fedge.edge.ingest.ingest``: ``align="shot"`` (the default) and ``align="keyframe"`` (the window centred on the keyframe,
the behaviour before shot-level alignment).

Measure: a shot with speech *keeps its audio* when one of the samples whose keyframe lies in it carries an audio
window that holds the speech: it covers at least half of the utterance, or (an utterance longer than a window)
the utterance fills at least half of it. Where a stored window came from is found by matching it against the
offline log-mel of the very WAV the ingest read (float16 storage). The fraction is over the shots that got a
sample (a keyframe lies in them), as a user counts stored samples that lost their speech; a shot whose audio the
quality gate removed, or whose span the keyframe detector merged with a neighbour's (it then holds two
utterances), counts as lost. Shots without any keyframe (a cut the detector missed) are counted apart, and
``all_shots`` gives the fraction over every shot.

Last line: ``audio_kept=… audio_kept_keyframe_centred=…``, then the same over all shots and the counts.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.common.media.audio import mel_power, power_to_db
from fedge.common.media.mel import MelParams
from fedge.edge.ingest import ingest
from fedge.edge.store import SampleStore
from fedge.simulations import avdigits

CONDITIONS = (("white", 30.0), ("white", 20.0), ("white", 10.0), ("pink", 20.0), ("pink", 15.0), ("pink", 10.0))
FRAMES = 32
NOISE_COLOURS = ("white", "pink")


def render(out: Path, *, seed: int, colour: str, snr_db: float, shots: int, fps: float, size: int,
           min_shot: float, max_shot: float) -> tuple[Path, Path, list[tuple[float, float]], list[tuple[float, float]]]:
    """Write one recording (its content drawn from ``seed`` and the condition); return (video, audio, shot
    spans (s), utterance spans (s))."""
    imgs, labels = avdigits.digit_images()
    _, rate, clips = avdigits.speech_clips()
    rng = np.random.default_rng([seed, 2201, NOISE_COLOURS.index(colour), round(snr_db * 10)])
    frames, speech, shot_spans, utterances, powers = [], [], [], [], []
    t = 0.0
    for _ in range(shots):
        n = max(2, round(rng.uniform(min_shot, max_shot) * fps))
        dur = n / fps
        i = int(rng.integers(len(imgs)))
        frames.append(avdigits.render_shot(imgs[i], n, size=size, noise=0.03, rng=rng))
        take = avdigits.augment_clip(clips[int(rng.integers(len(clips)))][int(labels[i])], rng)
        y, spans, p = avdigits.speech_track([[take]], rate=rate, shot_s=dur, rng=rng, speech="once")
        speech.append(y)
        powers.append(p)
        shot_spans.append((t, t + dur))
        utterances += [(t + a / rate, t + b / rate) for a, b in spans]
        t += dur
    y = np.concatenate(speech)
    y += avdigits.background_noise(y.size, power=float(np.mean(powers)) / 10 ** (snr_db / 10), colour=colour,
                                   rng=rng)
    video, audio = out / f"cam-{seed}-{colour}{snr_db:g}.avi", out / f"mic-{seed}-{colour}{snr_db:g}.wav"
    avdigits.write_video(video, np.concatenate(frames), fps)
    avdigits.write_wav(audio, np.clip(y, -1, 1), rate)
    return video, audio, shot_spans, utterances


def window_start(stored_db: np.ndarray, full_mel: np.ndarray, lo: int, hi: int) -> int | None:
    """Start frame in ``[lo, hi)`` of the offline window equal to a stored one (None: no window matches)."""
    lo, hi = max(0, lo), min(hi, full_mel.shape[1] - FRAMES + 1)
    best, err = None, np.inf
    for k in range(lo, hi):
        e = float(np.abs(power_to_db(full_mel[:, k : k + FRAMES], top_db=80.0) - stored_db).max())
        if e < err:
            best, err = k, e
    return best if err < 0.1 else None


def holds(window: tuple[float, float], utt: tuple[float, float]) -> bool:
    """The window holds the utterance: covers half of it, or (a long utterance) is half filled by it."""
    overlap = min(window[1], utt[1]) - max(window[0], utt[0])
    return overlap >= 0.5 * min(utt[1] - utt[0], window[1] - window[0])


def kept_shots(store: Path, audio: Path, shots: list[tuple[float, float]], utts: list[tuple[float, float]]
               ) -> tuple[int, int]:
    """(shots that keep their speech, shots with a sample) in ``store`` (see the module docstring)."""
    p = MelParams()
    y, sr = sf.read(audio, dtype="float32")
    full = mel_power(y, p)
    step = p.hop / sr
    kept, sampled = set(), set()
    with SampleStore(store) as st:
        for s in st.iter_samples():
            t = s.stream_time
            i = None if t is None else next((j for j, (a, b) in enumerate(shots) if a <= t < b), None)
            if i is None:
                continue
            sampled.add(i)
            if s.audio is None:
                continue
            a, b = shots[i]
            k = window_start(s.audio, full, round(a / step) - FRAMES, round(b / step) + 1)
            if k is not None and holds((k * step, (k + FRAMES) * step), utts[i]):
                kept.add(i)
    return len(kept), len(sampled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=6, help="Recordings per noise condition (one per seed).")
    ap.add_argument("--shots", type=int, default=12, help="Shots per recording.")
    ap.add_argument("--min-shot", type=float, default=1.0, help="Shortest shot, seconds.")
    ap.add_argument("--max-shot", type=float, default=3.0, help="Longest shot, seconds.")
    ap.add_argument("--fps", type=float, default=10.0, help="Camera frame rate.")
    ap.add_argument("--size", type=int, default=96, help="Frame side in pixels.")
    args = parse_quick(ap, seeds=1, shots=4)

    work = Path(tempfile.mkdtemp(prefix="fedge-align-"))
    totals = {"shot": 0, "keyframe": 0}
    sampled = {"shot": 0, "keyframe": 0}
    n_shots = 0
    t0 = time.perf_counter()
    try:
        for colour, snr in CONDITIONS:
            cond = {"shot": 0, "keyframe": 0}
            cond_sampled = {"shot": 0, "keyframe": 0}
            cond_shots = 0
            for seed in range(args.seeds):
                video, audio, shots, utts = render(work, seed=seed, colour=colour, snr_db=snr, shots=args.shots,
                                                   fps=args.fps, size=args.size, min_shot=args.min_shot,
                                                   max_shot=args.max_shot)
                for mode in ("shot", "keyframe"):
                    store = work / f"store-{mode}"
                    shutil.rmtree(store, ignore_errors=True)
                    ingest(video=video, audio=audio, store=store, align=mode)
                    k, n = kept_shots(store, audio, shots, utts)
                    cond[mode] += k
                    cond_sampled[mode] += n
                cond_shots += len(shots)
                video.unlink()
                audio.unlink()
            print(f"{colour:5s} noise {snr:4g} dB SNR: {cond_shots} shots with speech, "
                  f"{cond_shots - cond_sampled['shot']} without a keyframe; kept audio: shot-level "
                  f"{cond['shot'] / cond_sampled['shot']:.3f}, keyframe-centred "
                  f"{cond['keyframe'] / cond_sampled['keyframe']:.3f}", flush=True)
            for m in totals:
                totals[m] += cond[m]
                sampled[m] += cond_sampled[m]
            n_shots += cond_shots
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n_shots} shots over {args.seeds} seeds x {len(CONDITIONS)} noise conditions, "
          f"{sampled['shot']} with a sample, {time.perf_counter() - t0:.0f} s")
    print(f"audio_kept={totals['shot'] / sampled['shot']:.4f} "
          f"audio_kept_keyframe_centred={totals['keyframe'] / sampled['keyframe']:.4f} "
          f"all_shots_kept={totals['shot'] / n_shots:.4f} all_shots_kept_keyframe_centred="
          f"{totals['keyframe'] / n_shots:.4f} shots={n_shots} sampled={sampled['shot']} seeds={args.seeds}")


if __name__ == "__main__":
    main()
