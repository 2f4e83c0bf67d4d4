"""Where a device's training data comes from: its SampleStore in deployment, its partition in simulation.

Four sources, in this order of precedence:

* the node config names a ``store`` (a real device: ``fedge edge run --store DIR``) -> that SampleStore;
* ``data.source = "store"`` (a simulation built from real streams) -> ``<data.store_root>/device-<partition-id>``;
* ``data.source = "pool"`` (a large simulation) -> the rows of ``<data.store_root>``'s shared pool assigned to this
  ``partition-id`` (:mod:`fedge.common.pool`; memory-mapped, read only when the device trains or evaluates);
* ``data.source = "synthetic"`` -> the generated partition of this ``partition-id``.

Whatever the source, only the modalities the device has (node config ``modalities``) and the run uses
(``modal_types``) stay present in the mask; samples left with none are dropped. A camera-only or mic-only
device thus trains on what it has.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from fedge.common import pool
from fedge.common.config import MODALITIES, FedgeConfig
from fedge.common.dataset import check_store_labels
from fedge.common.synthetic import device_partition, make_av_dataset

from .node_config import NodeConfig

__all__ = [
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "SPLITS",
    "STORE_SPLITS",
    "load_store",
    "local_data",
    "modality_counts",
    "restrict_modalities",
    "simulated_modalities",
    "store_dir",
]

PARTITION_ID = "partition-id"  # set by Flower's simulation engine in node_config
NUM_PARTITIONS = "num-partitions"
SPLITS = ("train", "eval")
STORE_SPLITS = {"train": ("train",), "eval": ("val", "test")}  # SampleStore splits behind each of ours
_EVAL_SEED_OFFSET = 500_009  # a device's local evaluation samples come from a seed its training never uses


@lru_cache(maxsize=8)
def _synthetic(pid: int, nparts: int, seed: int, samples: int, num_classes: int, image_size: int,
               n_mels: int, frames: int, partition: str, alpha: float, miss_i: float, miss_a: float,
               split: str) -> dict[str, np.ndarray]:
    probs, mods = device_partition(
        pid, nparts, seed=seed, samples=samples, num_classes=num_classes, partition=partition,
        dirichlet_alpha=alpha, missing_image=miss_i, missing_audio=miss_a,
    )
    n, off = (samples, 0) if split == "train" else (max(20, samples // 4), _EVAL_SEED_OFFSET)
    return make_av_dataset(
        n, seed=seed * 100_003 + pid + 1 + off, num_classes=num_classes, image_size=image_size,
        n_mels=n_mels, frames=frames, label_probs=probs, modalities=mods,
    )


def store_dir(cfg: FedgeConfig, node: NodeConfig) -> Path | None:
    """The SampleStore directory this node trains from, or None for synthetic data."""
    if node.store:
        return Path(node.store)
    if cfg.data.source == "store":
        if not cfg.data.store_root:
            raise ValueError("data.source='store' needs data.store_root (a directory of device-<id> stores)")
        return Path(cfg.data.store_root) / f"device-{node.partition_id}"
    return None


def load_store(path: Path, cfg: FedgeConfig, split: str) -> dict[str, np.ndarray]:
    """The labelled samples of a SampleStore directory (layout of :mod:`fedge.common.training`).

    ``split="train"`` reads the store's ``train`` split; ``"eval"`` its ``val`` split, or ``test`` when the
    store holds no ``val`` samples. Unlabelled samples (label -1) are left out: local training is supervised.

    Raises
    ------
    fedge.common.dataset.DataError
        A label outside ``[0, model.num_classes)``: an error naming the store and the sample, not a silent drop.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"sample store not found: {path}")
    from .store import SampleStore  # the store needs SQLite and OpenCV: import it only when used

    m = cfg.model
    with SampleStore(path) as store:  # opening makes an empty directory an empty store
        check_store_labels(path, num_classes=m.num_classes)
        data = {}
        for name in STORE_SPLITS[split]:
            data = store.load_arrays(image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames, split=name)
            if len(data["label"]):
                break
    keep = data["label"] >= 0
    return {k: v[keep] for k, v in data.items()}


def restrict_modalities(data: dict[str, np.ndarray], keep: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Mask out modalities not in ``keep`` and drop samples left with none (their arrays stay aligned)."""
    on = np.array([m in keep for m in MODALITIES], dtype=bool)
    mask = np.asarray(data["mask"], dtype=bool) & on
    rows = mask.any(axis=1)
    out = {k: np.asarray(v)[rows] for k, v in data.items()}
    out["mask"] = mask[rows]
    return out


def local_data(cfg: FedgeConfig, node: NodeConfig, split: str = "train") -> dict[str, np.ndarray]:
    """The arrays this node trains (``split="train"``) or evaluates (``"eval"``) on."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = store_dir(cfg, node)
    keep = tuple(mod for mod in node.modalities if mod in cfg.modal_types)
    if cfg.data.source == "pool" and not node.store:
        data = pool.device_arrays(cfg.data.store_root, node.partition_id)
        if split == "eval":  # the pool is training material only, like a rendered device's store
            data = {k: v[:0] for k, v in data.items()}
        keep = tuple(mod for mod in keep if mod in simulated_modalities(cfg, node))
    elif path is not None:
        data = load_store(path, cfg, split)
        if not node.store:  # a simulated device on a given store: data.missing_* takes its camera or microphone
            keep = tuple(mod for mod in keep if mod in simulated_modalities(cfg, node))
    else:
        m, d = cfg.model, cfg.data
        data = _synthetic(node.partition_id, node.num_partitions, cfg.seed, d.samples_per_device,
                          m.num_classes, m.image_size, m.n_mels, m.audio_frames, d.partition,
                          d.dirichlet_alpha, d.missing_image, d.missing_audio, split)
    return restrict_modalities(data, keep)


def simulated_modalities(cfg: FedgeConfig, node: NodeConfig) -> tuple[str, ...]:
    """The modalities simulated device ``node.partition_id`` has under ``data.missing_image``/``missing_audio``
    (the same draw that decides which rendered devices record no video or no audio)."""
    d = cfg.data
    return device_partition(node.partition_id, max(node.num_partitions, 1), seed=cfg.seed, samples=1,
                            missing_image=d.missing_image, missing_audio=d.missing_audio)[1]


def modality_counts(data: dict[str, np.ndarray]) -> dict[str, int]:
    """Samples carrying each modality."""
    mask = np.asarray(data["mask"], dtype=bool)
    return {m: int(mask[:, j].sum()) for j, m in enumerate(MODALITIES)}
