"""A shared pool of rendered and ingested AV digits that a large population of simulated devices draws from.

With ``simulation.pool_samples = P`` nothing is rendered per device: ``P`` shots are rendered as single-digit
streams of :data:`CHUNK_SHOTS` shots (training images, every training speaker), ingested by the edge pipeline
in parallel like any device's streams, and exported as the pool's columns (:mod:`fedge.common.pool`). The pool is
cached under a key of everything that shapes it and nothing else, so every device count, partition and
missing-modality setting reuses it. Each device then draws ``data.samples_per_device`` pool rows
(:func:`pool_partition`): its labels follow ``data.partition`` (the same per-device draw as a rendered run:
Dirichlet label skew or uniform), and rows are dealt out without replacement, so devices are disjoint until
the pool runs out; only then is a row dealt again (``reuse`` says how many devices share a row at most).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common import pool as pool_files
from fedge.common.config import FedgeConfig
from fedge.common.fsio import atomic_dir

from . import avdigits

__all__ = [
    "CHUNK_SHOTS",
    "DONE",
    "assign",
    "device_label_counts",
    "finish_pool",
    "pool_dir_for",
    "pool_key",
    "pool_partition",
    "pool_plans",
    "render_jobs",
]

CHUNK_SHOTS = 25  # shots per rendered pool stream: long enough that the ingest's per-stream cost is amortised
DONE = "pool.json"
_FORMAT = 1


def pool_key(cfg: FedgeConfig) -> dict[str, Any]:
    """Every setting that shapes the pool: the renderer's and the ingest's options, the model's input sizes."""
    from . import stores
    from .prepare import render_options

    m = cfg.model
    return {"seed": cfg.seed, "shots": cfg.simulation.pool_samples, "render": render_options(cfg),
            "ingest": stores.ingest_options(cfg), "image_size": m.image_size, "chunk": CHUNK_SHOTS,
            "format": _FORMAT}


def pool_dir_for(cfg: FedgeConfig, cache_root: str | Path) -> Path:
    """The cache folder of the pool ``cfg`` describes (independent of the device count)."""
    digest = hashlib.sha256(json.dumps(pool_key(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_root) / f"pool-{cfg.simulation.pool_samples}shots-{digest}"


def pool_plans(shots: int, *, seed: int) -> list[avdigits.DevicePlan]:
    """The pool's streams: single-digit recordings of up to :data:`CHUNK_SHOTS` shots, digits in turn
    (balanced; at least one stream per digit).

    Images are training images of the stream's digit (never held-out ones), speakers uniform over the training
    speakers; deterministic in ``seed``. Pids are -100, -101, ... (no simulated device has them).
    """
    _, y = avdigits.digit_images()
    train_idx, _ = avdigits.image_split(seed)
    n_speakers = len(avdigits.speech_clips()[0])
    chunk = max(1, min(CHUNK_SHOTS, -(-shots // avdigits.NUM_CLASSES)))  # a small pool still has every digit
    plans = []
    for k, start in enumerate(range(0, shots, chunk)):
        n = min(chunk, shots - start)
        label = k % avdigits.NUM_CLASSES
        rng = np.random.default_rng([seed, 6007, k])
        images = rng.choice(train_idx[y[train_idx] == label], size=n)
        plans.append(avdigits.DevicePlan(
            pid=-100 - k, labels=np.full(n, label, dtype=np.int64), images=images.astype(np.int64),
            speakers=rng.integers(0, n_speakers, size=n).astype(np.int64), seed=int(rng.integers(2**31))))
    return plans


def device_label_counts(num_devices: int, *, samples_per_device: int, seed: int, partition: str,
                        dirichlet_alpha: float, num_classes: int) -> np.ndarray:
    """(num_devices, num_classes) int64: how many samples of each label each device draws.

    The same per-device draw as :func:`fedge.simulations.avdigits.plan_devices` (Dirichlet label mix from
    ``[seed, 91, pid]``, labels from ``[seed, 31, pid]``), computed per device in O(1) memory each.
    """
    if partition not in ("iid", "dirichlet"):
        raise ValueError(f"data.partition = {partition!r} cannot draw from a shared pool (the pool's samples "
                         "carry no speaker); use 'iid' or 'dirichlet' with simulation.pool_samples")
    out = np.zeros((num_devices, num_classes), dtype=np.int64)
    uniform = np.full(num_classes, 1.0 / num_classes)
    for pid in range(num_devices):
        p = uniform
        if partition == "dirichlet":
            p = np.random.default_rng([seed, 91, pid]).dirichlet([dirichlet_alpha] * num_classes)
        labels = np.random.default_rng([seed, 31, pid]).choice(num_classes, size=samples_per_device,
                                                                p=p / p.sum())
        out[pid] = np.bincount(labels, minlength=num_classes)
    return out


def pool_partition(labels: np.ndarray, counts: np.ndarray, *, seed: int) -> tuple[np.ndarray, int]:
    """Deal pool rows to devices: (assignment (devices, max samples) int32 rows, -1 padded; reuse).

    ``labels`` (P,) are the pool's labels, ``counts[d, c]`` how many rows of label ``c`` device ``d`` gets. For
    each label, its rows are shuffled (seeded) and dealt to devices in order without replacement; when they run
    out, a new seeded shuffle is dealt again, so two devices share a row only when the pool holds fewer rows of
    that label than the devices draw. A device never gets the same row twice (its count of a label is capped
    by the rows of that label). ``reuse`` is the most passes over any label's rows (1: all devices disjoint).

    Raises
    ------
    ValueError
        A label the devices draw has no row in the pool.
    """
    labels = np.asarray(labels)
    num_devices, num_classes = counts.shape
    width = int(counts.sum(axis=1).max()) if num_devices else 0
    table = np.full((num_devices, width), -1, dtype=np.int32)
    fill = np.zeros(num_devices, dtype=np.int64)
    reuse = 1
    for c in range(num_classes):
        need = counts[:, c]
        if not need.any():
            continue
        rows = np.flatnonzero(labels == c).astype(np.int32)
        if rows.size == 0:
            raise ValueError(f"the pool has no sample of label {c}: raise simulation.pool_samples")
        need = np.minimum(need, rows.size)
        n = rows.size
        decks: list[np.ndarray] = []  # pass k: the rows in a seeded order, each dealt once
        pos = 0
        for d in np.flatnonzero(need):
            k = int(need[d])
            if pos // n != (pos + k - 1) // n:  # a slice over two passes could repeat a row: start the next
                pos = -(-pos // n) * n
            while pos // n >= len(decks):
                decks.append(np.random.default_rng([seed, 5101, c, len(decks)]).permutation(rows))
            off = pos % n
            table[d, fill[d]:fill[d] + k] = decks[pos // n][off:off + k]
            fill[d] += k
            pos += k
        reuse = max(reuse, len(decks))
    return table, reuse


def render_jobs(cfg: FedgeConfig, work: Path, render_kw: dict[str, Any], ingest_kw: dict[str, Any]) -> list[tuple]:
    """The jobs of :mod:`fedge.simulations.prepare`'s render-and-ingest workers that make the pool under ``work``."""
    return [(p, str(work / "media" / f"pool{-p.pid - 100}"), str(work / "stores" / f"pool{-p.pid - 100}"),
             render_kw, ingest_kw) for p in pool_plans(cfg.simulation.pool_samples, seed=cfg.seed)]


def finish_pool(cfg: FedgeConfig, work: Path, pool_dir: Path, results: list[dict[str, Any]]) -> None:
    """Export the ingested pool streams under ``work`` as the pool's columns, then publish it at ``pool_dir``."""
    from . import stores

    m = cfg.model
    parts = [stores.store_arrays(store, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)
             for store in sorted((work / "stores").iterdir(), key=lambda p: int(p.name[4:]))]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ingest: dict[str, Any] = {}
    for r in results:
        for k, v in r.items():
            if k != "device" and isinstance(v, (int, float)):
                ingest[k] = ingest.get(k, 0) + v
    with atomic_dir(pool_dir) as tmp:
        pool_files.write_columns(tmp, arrays)
        (tmp / DONE).write_text(json.dumps({"key": pool_key(cfg), "samples": len(arrays["label"]),
                                            "labels": np.bincount(arrays["label"],
                                                                  minlength=avdigits.NUM_CLASSES).tolist(),
                                            "ingest": ingest}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def assign(cfg: FedgeConfig, pool_dir: Path, out: Path) -> dict[str, Any]:
    """The run's pool folder ``out``: the pool's columns (hard links, else copies) and each device's rows.

    Returns what ``prepared.json`` and the report say about the run's training data.
    """
    d, s = cfg.data, cfg.simulation
    meta = json.loads((pool_dir / DONE).read_text())
    labels = np.load(pool_files.column_path(pool_dir, "label"))
    counts = device_label_counts(s.devices, samples_per_device=d.samples_per_device, seed=cfg.seed,
                                 partition=d.partition, dirichlet_alpha=d.dirichlet_alpha,
                                 num_classes=cfg.model.num_classes)
    table, reuse = pool_partition(labels, counts, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    for f in pool_dir.glob("*.npy"):
        try:
            os.link(f, out / f.name)
        except OSError:  # another filesystem: a copy
            shutil.copyfile(f, out / f.name)
    np.save(out / pool_files.ASSIGNMENT, table)
    part = "iid" if d.partition == "iid" else f"dirichlet (alpha {d.dirichlet_alpha:g})"
    shared = "disjoint across devices" if reuse == 1 else f"a pool sample serves at most {reuse} devices"
    missing = f"; devices without a camera {d.missing_image:g}, without a microphone {d.missing_audio:g}" \
        if d.missing_image or d.missing_audio else ""
    return {
        "source": "shared pool",
        "train": (f"AV digits from a shared pool: {meta['samples']} samples rendered and ingested once "
                  f"({s.pool_samples} shots), each of {s.devices} devices draws {d.samples_per_device} by "
                  f"partition {part}, {shared}{missing}"),
        "pool": {"dir": str(pool_dir), "samples": meta["samples"], "labels": meta["labels"], "reuse": reuse,
                 "ingest": meta["ingest"]},
        "ingest": meta["ingest"],
    }
