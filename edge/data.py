"""Where a device's training data comes from: its SampleStore in deployment, its partition in simulation."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from common.config import FedgeConfig
from common.synthetic import device_partition, make_av_dataset

PARTITION_ID = "partition-id"  # set by Flower's simulation engine in node_config
NUM_PARTITIONS = "num-partitions"


@lru_cache(maxsize=8)
def _synthetic(pid: int, nparts: int, seed: int, samples: int, num_classes: int, image_size: int,
               n_mels: int, frames: int, partition: str, alpha: float, miss_i: float, miss_a: float
               ) -> dict[str, np.ndarray]:
    probs, mods = device_partition(
        pid, nparts, seed=seed, samples=samples, num_classes=num_classes, partition=partition,
        dirichlet_alpha=alpha, missing_image=miss_i, missing_audio=miss_a,
    )
    return make_av_dataset(
        samples, seed=seed * 100_003 + pid + 1, num_classes=num_classes, image_size=image_size,
        n_mels=n_mels, frames=frames, label_probs=probs, modalities=mods,
    )


def local_data(cfg: FedgeConfig, node_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays this node trains on."""
    if cfg.data.source == "synthetic":
        pid = int(node_config.get(PARTITION_ID, 0))
        nparts = int(node_config.get(NUM_PARTITIONS, 1))
        m, d = cfg.model, cfg.data
        return _synthetic(pid, nparts, cfg.seed, d.samples_per_device, m.num_classes, m.image_size,
                          m.n_mels, m.audio_frames, d.partition, d.dirichlet_alpha, d.missing_image,
                          d.missing_audio)
    raise ValueError(f"data.source={cfg.data.source!r} is not available on this device yet")
