"""Prepare a simulation's data: render each device's streams, run the edge ingest on them, write the held-out set.

For ``simulation.dataset = "avdigits"`` every virtual device gets its camera/microphone recordings rendered
(:mod:`fedge.simulations.avdigits`) and ingested by the very edge pipeline a device runs (:mod:`fedge.edge.ingest`:
keyframes, log-mel, alignment, quality gate) into its own SampleStore at ``<store_root>/device-<partition-id>``,
which the ClientApp opens with ``data.source = "store"``. A held-out device is rendered and ingested the same way
and exported as an NPZ (``data.eval_path``) for the server, which must not import edge code.

With ``simulation.pretrain_steps > 0`` the cloud's curated share (``simulation.cloud_samples`` labelled samples of
training images no device records) is rendered and ingested the same way, and the cloud pretrains the base on it
(:mod:`fedge.simulations.pretrain`); the returned config's ``model.base_path`` points every party at that base.

Prepared data is cached under a key of every setting that shapes it, so ``fedge simulate compare`` and repeated
runs reuse the same devices and data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.config import FedgeConfig
from fedge.common.fsio import atomic_dir

from . import avdigits

__all__ = [
    "CLOUD_NAME",
    "DONE",
    "EVAL_NAME",
    "data_dir_for",
    "data_key",
    "heldout_arrays",
    "prepare",
    "pretrains",
    "render_options",
    "with_data",
]

EVAL_NAME = "heldout.npz"
CLOUD_NAME = "cloud.npz"  # the cloud's curated share (simulation.pretrain_steps > 0)
DONE = "prepared.json"


def pretrains(cfg: FedgeConfig) -> bool:
    """Whether the cloud pretrains the base: ``simulation.pretrain_steps > 0``, AV digits, no ``model.base_path``
    given (a base the user names is used as it is)."""
    s = cfg.simulation
    return s.pretrain_steps > 0 and s.dataset == "avdigits" and not cfg.model.base_path


def data_key(cfg: FedgeConfig) -> dict[str, Any]:
    """Every setting that shapes the prepared data (and nothing else)."""
    d, s, m = cfg.data, cfg.simulation, cfg.model
    return {
        "dataset": s.dataset, "seed": cfg.seed, "devices": s.devices, "samples": d.samples_per_device,
        "eval": d.eval_samples, "partition": d.partition, "alpha": d.dirichlet_alpha,
        "missing_image": d.missing_image, "missing_audio": d.missing_audio, "fps": s.fps,
        "shot_s": s.shot_seconds, "size": s.frame_size, "noise": s.image_noise, "snr": s.snr_db,
        "image_size": m.image_size, "n_mels": m.n_mels, "frames": m.audio_frames, "format": 4,
        **({"speech": s.speech} if s.speech != "fill" else {}),
        **({"snr_spread": s.snr_db_spread} if s.snr_db_spread > 0 else {}),
        **({"cloud": s.cloud_samples} if pretrains(cfg) else {}),
        **({"eval_voices": d.eval_voices} if d.eval_voices != "train" else {}),
        **({"pool": s.pool_samples} if s.pool_samples else {}),
    }


def data_dir_for(cfg: FedgeConfig, cache_root: str | Path) -> Path:
    """The cache folder of the data ``cfg`` describes."""
    key = json.dumps(data_key(cfg), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_root) / f"{cfg.simulation.dataset}-{cfg.simulation.devices}dev-{digest}"


def with_data(cfg: FedgeConfig, data_dir: Path) -> FedgeConfig:
    """``cfg`` pointed at prepared data: stores (avdigits), the held-out NPZ and the pretrained base, if any."""
    data = dataclasses.replace(
        cfg.data, eval_path=str(data_dir / EVAL_NAME),
        **(({"source": "pool", "store_root": str(data_dir / "pool")} if cfg.simulation.pool_samples else
            {"source": "store", "store_root": str(data_dir / "stores")})
           if cfg.simulation.dataset == "avdigits" else {}),
    )
    cfg = dataclasses.replace(cfg, data=data)
    if pretrains(cfg) and (data_dir / CLOUD_NAME).is_file():
        from .pretrain import ensure_base

        with np.load(data_dir / CLOUD_NAME) as z:
            cloud = {k: z[k] for k in z.files}
        with np.load(data_dir / EVAL_NAME) as z:
            held = {k: z[k] for k in z.files}
        base = ensure_base(cfg, data_dir.resolve(), cloud, held)  # absolute: Ray workers may run elsewhere
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_path=str(base)))
        if not cfg.training.data_path:  # global training during the run (training.every_versions) uses it too
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(
                cfg.training, data_path=str((data_dir / CLOUD_NAME).resolve())))
    return cfg


def prepare(cfg: FedgeConfig, cache_root: str | Path, *, workers: int = 0, progress: bool = True) -> FedgeConfig:
    """Make the data ``cfg`` needs (or reuse the cache) and return ``cfg`` pointed at it."""
    data_dir = data_dir_for(cfg, cache_root)
    if not (data_dir / DONE).is_file():
        with atomic_dir(data_dir) as tmp:
            if cfg.simulation.dataset == "avdigits":
                summary = _prepare_avdigits(cfg, tmp, workers=workers, progress=progress,
                                            cache_root=Path(cache_root))
            else:
                summary = _prepare_synthetic(cfg, tmp)
            (tmp / DONE).write_text(json.dumps({"key": data_key(cfg), **summary}, indent=1))
    return with_data(cfg, data_dir)


def _prepare_synthetic(cfg: FedgeConfig, out: Path) -> dict[str, Any]:
    from fedge.common.synthetic import make_av_dataset

    m = cfg.model
    arrays = make_av_dataset(cfg.data.eval_samples, seed=cfg.seed * 100_003 + 99_991, num_classes=m.num_classes,
                             image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)
    np.savez(out / EVAL_NAME, **arrays)
    return {"eval_samples": len(arrays["label"])}


def render_options(cfg: FedgeConfig, **changes: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`fedge.simulations.avdigits.render_device` from the run config, with ``changes``."""
    s = cfg.simulation
    return {"fps": s.fps, "shot_s": s.shot_seconds, "size": s.frame_size, "image_noise": s.image_noise,
            "snr_db": s.snr_db, "snr_db_spread": s.snr_db_spread, "speech": s.speech, **changes}


def _render_and_ingest(job: tuple[avdigits.DevicePlan, str, str, dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """Worker: render one device's streams into ``media``, ingest them into ``store``; return ingest counts."""
    from . import stores

    plan, media, store, render_kw, ingest_kw = job
    streams = avdigits.render_device(plan, Path(media), **render_kw)
    totals: dict[str, Any] = {"device": plan.pid, "streams": len(streams), "shots": len(plan.labels)}
    split = "test" if plan.pid == -1 else "train"  # the held-out 'device' has pid -1, the cloud's share -2
    for s in streams:
        counts = stores.ingest_stream(video=s.video, audio=s.audio, store=Path(store), label=s.label,
                                      split=split, **ingest_kw)
        for k, v in counts.items():
            if isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0) + v
    shutil.rmtree(media, ignore_errors=True)  # the store holds what the device keeps; raw media go
    return totals


def _prepare_avdigits(cfg: FedgeConfig, out: Path, *, workers: int, progress: bool,
                      cache_root: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from . import pool, stores

    d, s, m = cfg.data, cfg.simulation, cfg.model
    render_kw = render_options(cfg)
    ingest_kw = stores.ingest_options(cfg)
    pool_dir = pool_work = None
    if s.pool_samples:  # devices draw from a shared pool, cached apart: every device count reuses it
        pool.device_label_counts(0, samples_per_device=1, seed=cfg.seed, partition=d.partition,
                                 dirichlet_alpha=d.dirichlet_alpha, num_classes=m.num_classes)  # before rendering
        pool_dir = pool.pool_dir_for(cfg, cache_root)
        plans = pool.pool_plans(s.pool_samples, seed=cfg.seed)  # the cloud's share avoids the pool's images
        jobs = []
        if not (pool_dir / pool.DONE).is_file():
            pool_work = pool_dir.with_name(pool_dir.name + f".work{os.getpid()}")
            shutil.rmtree(pool_work, ignore_errors=True)
            jobs = pool.render_jobs(cfg, pool_work, render_kw, ingest_kw)
    else:
        plans = avdigits.plan_devices(
            s.devices, samples_per_device=d.samples_per_device, seed=cfg.seed, partition=d.partition,
            dirichlet_alpha=d.dirichlet_alpha, missing_image=d.missing_image, missing_audio=d.missing_audio,
        )
        jobs = [(p, str(out / "media" / f"device-{p.pid}"), str(out / "stores" / f"device-{p.pid}"), render_kw,
                 ingest_kw) for p in plans]
    own = len(jobs)
    held = avdigits.heldout_plan(d.eval_samples, seed=cfg.seed, voices=d.eval_voices)
    jobs.append((held, str(out / "media" / "heldout"), str(out / "heldout-store"),
                 {**render_kw, "voices": d.eval_voices}, ingest_kw))
    cloud = pretrains(cfg)
    if cloud:  # the cloud's curated, labelled share: images no device records, never held-out ones
        jobs.insert(-1, (avdigits.cloud_plan(s.cloud_samples, seed=cfg.seed, devices=plans),
                         str(out / "media" / "cloud"), str(out / "cloud-store"), render_kw, ingest_kw))
    n = workers or max(1, min(os.cpu_count() or 1, 4))
    results = []
    bar = tqdm(total=len(jobs), desc="render+ingest devices", unit="dev", disable=not progress)
    if n == 1:
        for j in jobs:
            results.append(_render_and_ingest(j))
            bar.update()
    else:
        with ProcessPoolExecutor(n) as ex:
            for r in ex.map(_render_and_ingest, jobs, chunksize=max(1, len(jobs) // (8 * n))):
                results.append(r)
                bar.update()
    bar.close()
    shutil.rmtree(out / "media", ignore_errors=True)
    arrays = stores.store_arrays(out / "heldout-store", image_size=m.image_size, n_mels=m.n_mels,
                                        frames=m.audio_frames)
    np.savez(out / EVAL_NAME, **arrays)
    extra: dict[str, Any] = {}
    if cloud:
        c = stores.store_arrays(out / "cloud-store", image_size=m.image_size, n_mels=m.n_mels,
                                frames=m.audio_frames)
        np.savez(out / CLOUD_NAME, **c)
        extra["cloud_samples"] = len(c["label"])
    if pool_dir is not None:
        if pool_work is not None:
            pool.finish_pool(cfg, pool_work, pool_dir, results[:own])
        return {"devices": s.devices, "eval_samples": len(arrays["label"]), **extra,
                **pool.assign(cfg, pool_dir, out / "pool")}
    results = results[:own]
    totals: dict[str, Any] = {}
    for r in results:
        for k, v in r.items():
            if k != "device" and isinstance(v, (int, float)):
                totals[k] = totals.get(k, 0) + v
    return {"devices": len(plans), "eval_samples": len(arrays["label"]), **extra, "ingest": totals,
            "per_device": results}


def heldout_arrays(cfg: FedgeConfig, out: str | Path, *, voices: str, snr_db: float) -> dict[str, np.ndarray]:
    """Another take of the held-out device of ``cfg``: the same images, spoken by ``voices`` at ``snr_db``.

    Rendered and ingested by the edge pipeline like every device (into ``out``, replaced), for evaluating a model
    on audio conditions the run's own held-out set does not have (another noise level, unseen speakers, another
    language). Returns the store's samples as arrays.
    """
    from . import stores

    m = cfg.model
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)  # a store appends: start empty
    plan = avdigits.heldout_plan(cfg.data.eval_samples, seed=cfg.seed, voices=voices)
    render_kw = render_options(cfg, snr_db=snr_db, snr_db_spread=0.0, voices=voices)
    _render_and_ingest((plan, str(out / "media"), str(out / "store"), render_kw, stores.ingest_options(cfg)))
    return stores.store_arrays(out / "store", image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)
