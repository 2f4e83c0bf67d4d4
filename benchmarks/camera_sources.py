"""What the new ingest sources cost: a folder of photos and a live microphone.

* **Photos**: ``fedge``'s ingest of a folder of generated 1280x960 JPEG photos (decode, the keyframes'
  thumbnail + JPEG, quality gate, one SQLite transaction per sample) against the peer, a bare OpenCV loop doing
  only the decode and thumbnail (``cv2.imread`` + ``fedge.edge.keyframes.thumbnail``): ``photo_ingest_vs_decode`` is
  the ingest's images per second over the peer's (1.0: the gate and the store cost nothing).
* **Live microphone**: CPU seconds (this process and its ffmpeg child) per second of audio while ingesting an
  ffmpeg ``lavfi`` sine at real-time speed (``-re``, as a microphone delivers it), against the same ingest of
  the same audio from a WAV file (read as fast as it goes): ``live_cpu_per_audio_s`` is what a device pays
  to listen, ``live_vs_file_cpu`` the live source's overhead over a recording.

Last line: ``photos_per_s=… photo_ingest_vs_decode=… live_cpu_per_audio_s=… live_vs_file_cpu=…``.

    .venv/bin/python benchmarks/camera_sources.py [--photos 120] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import soundfile as sf
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.edge.ingest import ingest
from fedge.edge.keyframes import thumbnail

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` distinct 1280x960 JPEGs: random crops, flips and exposure of skimage's colour photos."""
    rng = np.random.default_rng(seed)
    bases = [getattr(skimage.data, name)() for name in PHOTOS]
    bases = [b if b.ndim == 3 else np.stack([b] * 3, -1) for b in bases]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        b = bases[i % len(bases)][:, :, :3]
        h, w = b.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = cv2.resize(b[y : y + ch, x : x + cw, ::-1], (1280, 960), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        cv2.imwrite(str(folder / f"photo{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (ffmpeg)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=120, help="Photos in the generated folder.")
    ap.add_argument("--seconds", type=float, default=6.0, help="Seconds of live audio to ingest.")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved runs; the fastest counts.")
    args = parse_quick(ap, photos=10, seconds=1.0, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_photos(d / "photos", args.photos)
        paths = sorted((d / "photos").iterdir())
        fedge_s, peer_s, stored = [], [], 0
        for r in range(args.repeats):
            t = time.perf_counter()
            for p in paths:
                thumbnail(cv2.imread(str(p), cv2.IMREAD_COLOR))
            peer_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            rep = ingest(video=d / "photos", store=d / f"store{r}")
            fedge_s.append(time.perf_counter() - t)
            stored = rep.samples_stored
        photos_per_s = len(paths) / min(fedge_s)
        ratio = min(peer_s) / min(fedge_s)
        print(f"photos: {len(paths)} ({stored} stored), fedge {min(fedge_s):.2f} s, decode+thumbnail "
              f"{min(peer_s):.2f} s")

        sr = 16000
        t_ax = np.arange(int(sr * args.seconds)) / sr
        sf.write(d / "sine.wav", (0.125 * np.sin(2 * np.pi * 440 * t_ax)).astype(np.float32), sr)
        c0 = cpu_seconds()
        live = ingest(audio=f"lavfi:sine=frequency=440:sample_rate={sr}", store=d / "live",
                      max_seconds=args.seconds)
        live_cpu = (cpu_seconds() - c0) / live.audio_seconds
        c0 = cpu_seconds()
        rec = ingest(audio=d / "sine.wav", store=d / "file")
        file_cpu = (cpu_seconds() - c0) / rec.audio_seconds
        print(f"live: {live.audio_seconds:.1f} s of audio, {live.samples_stored} samples, "
              f"{live_cpu:.4f} CPU s per audio s; file: {file_cpu:.4f}")
    print(f"photos_per_s={photos_per_s:.1f} photo_ingest_vs_decode={ratio:.3f} "
          f"live_cpu_per_audio_s={live_cpu:.4f} live_vs_file_cpu={live_cpu / file_cpu:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
