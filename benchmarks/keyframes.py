"""Shot-boundary accuracy and speed: fedge vs PySceneDetect (ContentDetector, AdaptiveDetector) vs pure decode.

Generates edited videos with known boundaries from real photos that ship inside scikit-image's wheel
(astronaut, coffee, chelsea, rocket, hubble, retina, the stereo motorcycle pair, ...): a virtual camera moves
over each photo (static, slow and fast pans, zooms, shake), with sensor noise, objects sliding across,
one- and two-frame flashes and dark low-contrast grades; shots are joined by hard cuts (including reframes of
the same photo and stereo-pair cuts), dissolves, fades through black and wipes, and some shots are only a few
frames long. Videos are written with OpenCV's mp4v encoder, so every detector sees real codec artefacts.

Scoring (per the issue): a hard cut is found by a detection within +-2 frames; a gradual transition by a
detection anywhere inside it +-2 frames; each detection counts once. Speed: frames per second over the same
files, including decode, for fedge's whole keyframe extraction (detection + keyframe JPEGs), for each
PySceneDetect detector (its own OpenCV backend, default settings) and for a plain single-thread
``cv2.VideoCapture.read()`` loop in Python (the decode limit; OpenCV's FFmpeg backend decodes with its default
threads there). fedge runs as shipped: a reader thread decodes (FFmpeg on one thread) up to 4 analysed frames
ahead while the main thread thumbnails and detects, so on a machine with a free core decode and analysis
overlap; on a saturated machine the ratio falls to what the CPU time allows.

Run: ``.venv/bin/python benchmarks/keyframes.py`` (about 2-4 minutes; ``--videos`` and ``--shots`` make it
shorter or longer). Last line: ``f1=... content_f1=... adaptive_f1=... speed_vs_decode=... speed_vs_content=...``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

from fedge.common.media.scenes import Shot, Transition, iter_render, match
from fedge.edge.keyframes import extract_keyframes

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "hubble_deep_field",
          "immunohistochemistry", "coins", "clock", "grass", "gravel", "brick", "retina", "horse", "page",
          "text", "cell", "colorwheel", "logo"]


def load_photos() -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Real photos from scikit-image's wheel as BGR uint8 (no download), and the stereo motorcycle pair."""
    from skimage import data

    def bgr(x: np.ndarray) -> np.ndarray:
        if x.dtype == bool:
            x = x.astype(np.uint8) * 255
        if x.ndim == 2:
            x = np.dstack([x] * 3)
        return np.ascontiguousarray(x[:, :, 2::-1])

    photos = {n: bgr(getattr(data, n)()) for n in PHOTOS}
    left, right = data.stereo_motorcycle()[:2]
    return photos, (bgr(left), bgr(right))


def random_edit(rng: np.random.Generator, photos: dict[str, np.ndarray], stereo: tuple[np.ndarray, np.ndarray],
                n_shots: int) -> tuple[list[Shot], list[tuple[str, int]]]:
    """A random edit: shots with varied camera work, joined by varied transitions."""
    names = list(photos)
    shots: list[Shot] = []
    joins: list[tuple[str, int]] = []
    prev: str | None = None
    stereo_next = False
    for k in range(n_shots):
        special = rng.random() if k > 0 else 1.0
        if stereo_next:  # second half of a stereo pair: the right view, cut straight from the left one
            name, img, stereo_next = "stereo-right", stereo[1], False
        elif special < 0.08 and prev in photos:  # reframe: same photo, new framing
            name, img = str(prev), photos[str(prev)]
        elif special < 0.12 and k < n_shots - 1:  # stereo pair: left view then right view
            name, img, stereo_next = "stereo", stereo[0], True
        else:
            name = str(rng.choice([n for n in names if n != prev]))
            img = photos[name]
        short = rng.random() < 0.12
        frames = int(rng.integers(4, 11)) if short else int(rng.integers(25, 110))
        kind = rng.choice(["static", "slowpan", "fastpan", "zoom", "shake", "slide"],
                          p=[0.25, 0.2, 0.12, 0.18, 0.1, 0.15])
        kw: dict = {"center": (float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))),
                    "zoom": float(rng.uniform(1.0, 1.6)), "noise": float(rng.choice([0, 2, 5, 10]))}
        if special < 0.08 and name == prev:
            kw["zoom"] = float(rng.uniform(1.3, 2.0))
        if name.startswith("stereo"):
            kw = {"center": (0.5, 0.5), "zoom": 1.0, "noise": kw["noise"]}
            kind = "static"
        if kind == "slowpan":
            kw["pan"] = (float(rng.uniform(-2, 2)), float(rng.uniform(-1, 1)))
            kw["zoom"] = max(kw["zoom"], 1.5)
        elif kind == "fastpan":
            kw["pan"] = (float(rng.choice([-1, 1]) * rng.uniform(6, 14)), float(rng.uniform(-2, 2)))
            kw["zoom"] = float(rng.uniform(2.0, 3.0))
        elif kind == "zoom":
            kw["zoom_rate"] = float(rng.choice([-1, 1]) * rng.uniform(0.003, 0.015))
            kw["zoom"] = max(kw["zoom"], 1.3)
        elif kind == "shake":
            kw["shake"] = float(rng.uniform(1.0, 3.0))
        elif kind == "slide":
            other = photos[str(rng.choice(names))]
            sh = int(rng.integers(40, 100))
            y, x = int(rng.integers(0, other.shape[0] - 40)), int(rng.integers(0, other.shape[1] - 40))
            kw["sprite"] = cv2.resize(other[y:y + 40, x:x + 40], (sh, sh))
            kw["sprite_speed"] = float(rng.choice([-1, 1]) * rng.uniform(3, 10))
        if rng.random() < 0.25 and frames > 20:
            kw["flashes"] = tuple(int(f) for f in rng.integers(5, frames - 5, size=int(rng.integers(1, 3))))
            kw["flash_len"] = int(rng.integers(1, 3))
        if rng.random() < 0.15:
            kw["grade"] = (float(rng.uniform(4, 10)), float(rng.uniform(0.08, 0.15)))
        shots.append(Shot(img, frames, **kw))
        if k > 0:
            r = rng.random()
            if name == prev or name == "stereo-right" or short or shots[-2].frames < 12 or r < 0.62:
                joins.append(("cut", 0))
            elif r < 0.75:
                joins.append(("dissolve", int(rng.integers(8, 31))))
            elif r < 0.88:
                joins.append(("fade", int(rng.integers(10, 31))))
            else:
                joins.append(("wipe", int(rng.integers(8, 25))))
        prev = name
    return shots, joins


def write_video(path: Path, shots: list[Shot], joins: list[tuple[str, int]], size: tuple[int, int], fps: float,
                seed: int) -> tuple[int, list[Transition]]:
    truth: list[Transition] = []
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    n = 0
    for frame in iter_render(shots, joins, size, seed, truth):
        writer.write(frame)
        n += 1
    writer.release()
    return n, truth


def decode_fps(path: Path) -> tuple[int, float]:
    cap = cv2.VideoCapture(str(path))
    n, t = 0, time.perf_counter()
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    dt = time.perf_counter() - t
    cap.release()
    return n, dt


def fedge_run(path: Path) -> tuple[list[int], float]:
    t = time.perf_counter()
    report = extract_keyframes(path)
    return report.boundaries, time.perf_counter() - t


def scenedetect_run(path: Path, detector: str) -> tuple[list[int], float]:
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager
    from scenedetect import open_video as sd_open

    t = time.perf_counter()
    video = sd_open(str(path), backend="opencv")
    sm = SceneManager()
    sm.add_detector(ContentDetector() if detector == "content" else AdaptiveDetector())
    sm.detect_scenes(video)
    scenes = sm.get_scene_list()
    dt = time.perf_counter() - t
    return [s[0].frame_num for s in scenes[1:]], dt


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / max(1, tp + fp)
    r = tp / max(1, tp + fn)
    return p, r, (2 * p * r / max(1e-12, p + r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=8, help="number of generated videos")
    ap.add_argument("--shots", type=int, default=16, help="shots per video")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats for decode and fedge (min is kept)")
    args = parse_quick(ap, videos=1, shots=4, width=320, height=180, repeats=1)

    photos, stereo = load_photos()
    rng = np.random.default_rng(args.seed)
    counts = {m: [0, 0, 0] for m in ("fedge", "content", "adaptive")}
    times = {m: 0.0 for m in ("decode", "fedge", "content", "adaptive")}
    per_kind: dict[str, list[int]] = {}
    total_frames = 0
    with tempfile.TemporaryDirectory(prefix="fedge-kf-bench-") as tmp:
        for v in range(args.videos):
            shots, joins = random_edit(rng, photos, stereo, args.shots)
            path = Path(tmp) / f"edit{v:02d}.mp4"
            n, truth = write_video(path, shots, joins, (args.width, args.height), args.fps, args.seed + v)
            total_frames += n
            dec = min(decode_fps(path)[1] for _ in range(args.repeats))
            runs = [fedge_run(path) for _ in range(args.repeats)]
            found, t_fedge = runs[0][0], min(r[1] for r in runs)
            c_found, t_c = scenedetect_run(path, "content")
            a_found, t_a = scenedetect_run(path, "adaptive")
            times["decode"] += dec
            times["fedge"] += t_fedge
            times["content"] += t_c
            times["adaptive"] += t_a
            line = []
            for m, det in (("fedge", found), ("content", c_found), ("adaptive", a_found)):
                tp, fp, fn = match(truth, det, tol=2)
                counts[m][0] += tp
                counts[m][1] += fp
                counts[m][2] += fn
                line.append(f"{m} tp={tp} fp={fp} fn={fn}")
            for t in truth:  # recall of fedge per transition kind
                hit = match([t], found, tol=2)[0]
                per_kind.setdefault(t.kind, [0, 0])
                per_kind[t.kind][0] += hit
                per_kind[t.kind][1] += 1
            kinds = ",".join(sorted({t.kind for t in truth}))
            print(f"video {v}: {n} frames, {len(truth)} boundaries ({kinds}); " + "; ".join(line), flush=True)
            os.remove(path)

    print(f"\n{total_frames} frames at {args.width}x{args.height}, {args.fps:g} fps (mp4v)")
    print("fedge recall by kind: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in sorted(per_kind.items())))
    f1 = {}
    for m, (tp, fp, fn) in counts.items():
        p, r, f = prf(tp, fp, fn)
        f1[m] = f
        print(f"{m:9s} precision={p:.3f} recall={r:.3f} F1={f:.3f} (tp={tp} fp={fp} fn={fn})")
    fps = {m: total_frames / t for m, t in times.items()}
    print("frames per second: " + ", ".join(f"{m} {v:.0f}" for m, v in fps.items()))
    print(f"f1={f1['fedge']:.4f} content_f1={f1['content']:.4f} adaptive_f1={f1['adaptive']:.4f} "
          f"speed_vs_decode={fps['fedge'] / fps['decode']:.2f} speed_vs_content={fps['fedge'] / fps['content']:.2f}")


if __name__ == "__main__":
    main()
