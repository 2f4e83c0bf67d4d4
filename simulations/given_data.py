"""A simulation on data the user names: device stores, an evaluation set and the cloud's pretraining data.

With ``data.source = "store"`` and ``data.store_root`` set, ``fedge simulate`` renders nothing: virtual device
``i`` trains on the SampleStore ``<data.store_root>/device-<i>`` (made by ``fedge edge ingest``), the server
evaluates on ``data.eval_path`` as given (a store or an NPZ; empty: no accuracy, said at start), and
``data.missing_image`` / ``missing_audio`` take the camera or microphone of the same devices they would take in a
rendered run (:func:`fedge.edge.data.simulated_modalities`). ``simulation.pretrain_data`` (a store or an NPZ) is the
cloud's labelled data for the base pretraining, in any simulation. Everything is checked before Ray starts: a
missing store, a label outside the model's classes, or a device that ``missing_*`` would leave with nothing to
train on is a one-line error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from fedge.common.config import MODALITIES, FedgeConfig
from fedge.common.dataset import DB_NAME, DataError, check_store_labels, describe, is_store, load_data

__all__ = ["GivenDataError", "absolute_paths", "check_given_stores", "pretrain_on_given", "resolve_data",
           "uses_given_stores"]


class GivenDataError(DataError):
    """Data the user named cannot be used as configured; the message is one line."""


def uses_given_stores(cfg: FedgeConfig) -> bool:
    """Whether the run trains on the user's stores (``data.source = "store"`` with ``data.store_root``).

    Raises
    ------
    GivenDataError
        ``data.source = "store"`` without ``data.store_root`` in a run that renders no stores (``simulation.dataset
        = "synthetic"``): its devices would have no data; or ``data.store_root`` with another ``data.source``.
    """
    if cfg.data.store_root and cfg.data.source != "store":  # stores named but not used would go unnoticed
        raise GivenDataError(f"data.store_root is {cfg.data.store_root!r} but data.source is "
                             f"'{cfg.data.source}': set data.source = 'store' to train on those stores")
    if cfg.data.source == "store" and not cfg.data.store_root and cfg.simulation.dataset != "avdigits":
        raise GivenDataError(f"data.source = 'store' needs data.store_root (one store per device, device-0 .."
                             f" device-{cfg.simulation.devices - 1}); simulation.dataset = "
                             f"'{cfg.simulation.dataset}' renders none")
    return cfg.data.source == "store" and bool(cfg.data.store_root)


def resolve_data(cfg: FedgeConfig, cache_root: str | Path, *, progress: bool = True) -> tuple[FedgeConfig,
                                                                                                 dict[str, Any]]:
    """``cfg`` pointed at the run's data, and what the run directory's ``prepared.json`` says about it.

    The user's stores when given (checked, nothing rendered), else the scenario's data prepared (rendered and
    ingested, or generated; cached), with a ``data.eval_path`` the user names kept as given; a base pretrained
    on ``simulation.pretrain_data`` when named. Paths become absolute.
    """
    from .prepare import DONE, prepare

    cfg = absolute_paths(cfg)  # the data the user names, wherever the Ray workers run
    cfg = pretrain_on_given(cfg, cache_root)  # simulation.pretrain_data: the cloud's base on the user's data
    if uses_given_stores(cfg):  # the user's stores and eval set, as given: nothing rendered
        summary = check_given_stores(cfg)
    else:
        given_eval = cfg.data.eval_path
        cfg = prepare(cfg, cache_root, progress=progress)
        summary = json.loads((Path(cfg.data.eval_path).parent / DONE).read_text())
        summary["eval"] = describe(given_eval or cfg.data.eval_path)
        if given_eval:  # an eval set the user names replaces the rendered held-out one
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=given_eval))
            summary.pop("eval_samples", None)
    if cfg.simulation.pretrain_data:
        summary["pretrain"] = describe(cfg.simulation.pretrain_data)
    return cfg, summary


def absolute_paths(cfg: FedgeConfig) -> FedgeConfig:
    """``cfg`` with the data paths it names made absolute (relative ones are read from where fedge runs, and
    the simulation's Ray workers may run elsewhere)."""
    def absolute(p: str) -> str:
        return str(Path(p).resolve()) if p else p

    d, s = cfg.data, cfg.simulation
    return dataclasses.replace(
        cfg, data=dataclasses.replace(d, store_root=absolute(d.store_root), eval_path=absolute(d.eval_path)),
        simulation=dataclasses.replace(s, pretrain_data=absolute(s.pretrain_data)))


def _train_counts(store: Path) -> dict[str, int]:
    """Labelled ``train`` samples of a store by modality set (read-only, nothing decoded)."""
    conn = sqlite3.connect(f"file:{store / DB_NAME}?mode=ro", uri=True, timeout=30.0)
    try:
        return dict(conn.execute("SELECT modalities, COUNT(*) FROM samples WHERE label IS NOT NULL AND"
                                 " split = 'train' GROUP BY modalities").fetchall())
    except sqlite3.Error as e:
        raise GivenDataError(f"data.store_root: cannot read {store} ({e})") from None
    finally:
        conn.close()


def check_given_stores(cfg: FedgeConfig) -> dict[str, Any]:
    """Check the user's device stores and evaluation set against the run; return what the report names.

    Raises
    ------
    GivenDataError, fedge.common.dataset.DataError
        A device store is missing or has no labelled training sample the device may use, a label lies outside
        the model's classes, or the evaluation set cannot be read or does not fit the model.
    """
    from fedge.edge.data import simulated_modalities
    from fedge.edge.node_config import NodeConfig

    d, m, n = cfg.data, cfg.model, cfg.simulation.devices
    root = Path(d.store_root)
    if not root.is_dir():
        raise GivenDataError(f"data.store_root {root}: not a directory (it holds one store per device, "
                             "device-0 .. device-<simulation.devices - 1>)")
    missing = [i for i in range(n) if not is_store(root / f"device-{i}")]
    if missing:
        found = sorted(p.name for p in root.glob("device-*") if is_store(p))
        raise GivenDataError(f"data.store_root {root}: no store device-{missing[0]} for simulation.devices = {n} "
                             f"({len(missing)} missing; found: {', '.join(found) or 'none'})")
    devices = []
    for i in range(n):
        store = root / f"device-{i}"
        check_store_labels(store, num_classes=m.num_classes, what="data.store_root")
        counts = _train_counts(store)
        node = NodeConfig(partition_id=i, num_partitions=n)
        has = simulated_modalities(cfg, node)
        usable = sum(c for mods, c in counts.items() if any(x in has for x in mods.split("+")))
        if not usable:
            why = (f"with data.missing_image = {d.missing_image:g} and data.missing_audio = {d.missing_audio:g} "
                   f"it has only {'+'.join(has)}, and its labelled training samples are "
                   f"{', '.join(f'{k} {v}' for k, v in counts.items())}") if counts else \
                "it holds no labelled sample in split 'train'"
            raise GivenDataError(f"data.store_root: device-{i} ({store}) has nothing to train on: {why}")
        devices.append({"device": i, "modalities": "+".join(x for x in MODALITIES if x in has),
                        "train_samples": usable})
    out: dict[str, Any] = {"source": "given stores", "store_root": str(root.resolve()), "devices": n,
                           "per_device": devices, "train": f"stores {root.resolve()}/device-0..{n - 1}"}
    if d.eval_path:
        held = load_data(d.eval_path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                         num_classes=m.num_classes, what="data.eval_path")
        out.update(eval=describe(d.eval_path), eval_samples=len(held["label"]))
    else:
        out["eval"] = "none (data.eval_path is empty: no accuracy)"
    return out


def pretrain_on_given(cfg: FedgeConfig, cache_root: str | Path) -> FedgeConfig:
    """``cfg`` pointed at a base pretrained on ``simulation.pretrain_data`` (trained once, cached by data and
    settings); unchanged when no pretraining data is named, ``simulation.pretrain_steps`` is 0 or the run names
    its own ``model.base_path``."""
    s, m = cfg.simulation, cfg.model
    if not s.pretrain_data or s.pretrain_steps <= 0 or m.base_path:
        return cfg
    from .pretrain import ensure_base

    data = load_data(s.pretrain_data, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                     num_classes=m.num_classes, what="simulation.pretrain_data")
    held = None
    if cfg.data.eval_path:
        held = load_data(cfg.data.eval_path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                         num_classes=m.num_classes, what="data.eval_path")
    src = Path(s.pretrain_data).resolve()
    db = src / DB_NAME if src.is_dir() else src
    stamp = json.dumps([str(src), db.stat().st_mtime_ns, db.stat().st_size, cfg.data.eval_path])
    folder = Path(cache_root) / f"pretrain-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    base = ensure_base(cfg, folder.resolve(), data, held)  # absolute: Ray workers may run elsewhere
    return dataclasses.replace(cfg, model=dataclasses.replace(m, base_path=str(base)))
