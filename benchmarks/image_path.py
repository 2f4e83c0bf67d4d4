"""Where the image path loses the digit: the same classifiers trained on each stage between the card and the model.

AV digits' camera material (:mod:`fedge.simulations.avdigits`: a handwritten digit card in a textured scene, panning
camera, sensor noise) is rendered shot by shot, written as an MJPG video per digit and run through the edge's
keyframe extraction (:func:`fedge.edge.keyframes.iter_keyframes`: shot detection, keyframe choice, JPEG). Train
images and test images are disjoint (``avdigits.image_split``). At each stage the same two classifiers are
trained centrally from scratch on the training images and scored on the test images:

* ``peer``: a plain small CNN (two conv + pool blocks, a 4x4 grid kept, two linear layers);
* ``fedge``: the model's :class:`fedge.common.model.ImageEncoder` with a linear classifier on its vector.

Stages: ``source`` (the 8x8 scans, upsampled to the model's input size), ``frame`` (the rendered camera frame at
the middle of the shot, area-resized to the input size: the scene and camera, no codec), ``keyframe`` (the
stored keyframe JPEG, decoded and resized whole), ``crop`` (the same JPEG through the decode a device does,
:func:`fedge.common.dataset.decode_image`: cut to its salient region, then resized: what the encoder gets). A stage
where both classifiers drop locates the loss in the data; a stage where only ``fedge`` drops locates it in the
encoder. ``--card 0.4 0.5`` renders the card smaller in the frame (held farther from the camera).

Last line: ``source_peer=… source_fedge=… frame_peer=… frame_fedge=… keyframe_peer=… keyframe_fedge=…
crop_peer=… crop_fedge=… fedge_vs_peer=…`` (accuracies; the ratio is fedge / peer on the crop stage, what a
device trains on).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import torch
import torch.nn.functional as F
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder
from torch import nn

from fedge.common.config import ModelConfig
from fedge.common.dataset import decode_image
from fedge.common.model import ImageEncoder
from fedge.edge.keyframes import iter_keyframes
from fedge.simulations import avdigits


class PeerCNN(nn.Module):
    """A plain small CNN: (B, 3, S, S) in [0, 1] -> (B, C)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.25)


class EncoderClassifier(nn.Module):
    """fedge's image encoder and a linear classifier: (B, 3, S, S) -> (B, C)."""

    def __init__(self, num_classes: int = 10, dim: int = 64) -> None:
        super().__init__()
        self.enc = ImageEncoder(dim=dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(x))


def render_stages(plan: avdigits.DevicePlan, work: Path, *, size: int, fps: float, shot_s: float,
                  noise: float, input_size: int, card_fraction: tuple[float, float]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (N, 3, S, S) in [0, 1] and labels (N,) of one plan at each stage."""
    import cv2

    imgs, _ = avdigits.digit_images()
    rng = np.random.default_rng(plan.seed)
    per_shot = max(2, round(shot_s * fps))
    src, frames, labels, key, crop, key_labels = [], [], [], [], [], []
    for label in sorted(set(plan.labels.tolist())):
        rows = np.flatnonzero(plan.labels == label)
        shots = [avdigits.render_shot(imgs[plan.images[i]], per_shot, size=size, noise=noise, rng=rng,
                                      card_fraction=card_fraction) for i in rows]
        for i, shot in zip(rows, shots):
            card = cv2.resize(1.0 - imgs[plan.images[i]], (input_size, input_size), interpolation=cv2.INTER_CUBIC)
            src.append(np.repeat(card.clip(0, 1)[None], 3, axis=0))
            mid = cv2.resize(shot[per_shot // 2], (input_size, input_size), interpolation=cv2.INTER_AREA)
            frames.append(mid[:, :, ::-1].transpose(2, 0, 1) / 255.0)
            labels.append(label)
        video = work / f"cam-{plan.pid}-{label}.avi"
        avdigits.write_video(video, np.concatenate(shots), fps)
        for k in iter_keyframes(video):
            key.append(decode_image(k.jpeg, input_size, crop=False))
            crop.append(decode_image(k.jpeg, input_size))
            key_labels.append(label)
        video.unlink()
    lab = np.array(labels, dtype=np.int64)
    return {"source": (np.stack(src).astype(np.float32), lab),
            "frame": (np.stack(frames).astype(np.float32), lab),
            "keyframe": (np.stack(key).astype(np.float32), np.array(key_labels, dtype=np.int64)),
            "crop": (np.stack(crop).astype(np.float32), np.array(key_labels, dtype=np.int64))}


def fit_score(model: nn.Module, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
              epochs: int, seed: int, batch_size: int = 64, lr: float = 2e-3) -> float:
    """Train ``model`` with Adam on ``train`` and return its accuracy on ``test``."""
    x, y = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            i = perm[s:s + batch_size]
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(test[0])).argmax(1).numpy()
    return float((pred == test[1]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1000, help="training shots (cards) rendered")
    p.add_argument("--test", type=int, default=400, help="test shots (cards of held-out images) rendered")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of each classifier at each stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the image split, the rendering and the training")
    p.add_argument("--frame-size", type=int, default=96, help="rendered camera frame side in pixels")
    p.add_argument("--noise", type=float, default=0.03, help="camera sensor noise (std, fraction of full scale)")
    p.add_argument("--card", type=float, nargs=2, default=(0.85, 0.95), metavar=("LO", "HI"),
                   help="the card's side as a fraction of the frame's, drawn per shot in [LO, HI] (AV digits: 0.85 "
                        "0.95; e.g. 0.4 0.5 for a card held far from the camera)")
    args = parse_quick(p, train=60, test=40, epochs=1)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    s = ModelConfig().image_size
    t0 = time.perf_counter()
    train_plan = avdigits.cloud_plan(args.train, seed=args.seed, devices=[])
    test_plan = avdigits.heldout_plan(args.test, seed=args.seed)
    kw = {"size": args.frame_size, "fps": 10.0, "shot_s": 1.0, "noise": args.noise, "input_size": s,
          "card_fraction": tuple(args.card)}
    with tempfile.TemporaryDirectory() as tmp:
        train = render_stages(train_plan, Path(tmp), **kw)
        test = render_stages(test_plan, Path(tmp), **kw)
    print(f"rendered {len(train['source'][1])} train / {len(test['source'][1])} test shots, "
          f"{len(train['keyframe'][1])} / {len(test['keyframe'][1])} keyframes, input {s}x{s} px "
          f"({time.perf_counter() - t0:.0f} s)")
    res: dict[str, float] = {}
    for stage in ("source", "frame", "keyframe", "crop"):
        for name, make in (("peer", PeerCNN), ("fedge", EncoderClassifier)):
            torch.manual_seed(args.seed)
            res[f"{stage}_{name}"] = fit_score(make(), train[stage], test[stage], epochs=args.epochs, seed=args.seed)
        print(f"{stage:>9}: peer CNN {res[f'{stage}_peer']:.3f}   fedge encoder {res[f'{stage}_fedge']:.3f}")
    res["fedge_vs_peer"] = res["crop_fedge"] / max(res["crop_peer"], 1e-9)
    print(" ".join(f"{k}={v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
