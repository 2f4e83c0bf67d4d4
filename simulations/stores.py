"""The simulation's use of the edge data path: ingest a rendered stream into a SampleStore, read a store back.

Thin glue over :mod:`edge.ingest` and :mod:`edge.store` (the code a device runs), so that simulated devices
get their samples through keyframe extraction, log-mel features, alignment and the quality gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.config import FedgeConfig


def ingest_options(cfg: FedgeConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`ingest_stream` that come from the run config (picklable)."""
    m = cfg.model
    return {"image_size": m.image_size, "n_mels": m.n_mels, "frames": m.audio_frames}


def ingest_stream(*, video: Path | None, audio: Path | None, store: Path, label: int, image_size: int,
                  n_mels: int, frames: int) -> dict[str, Any]:
    """Run the edge ingest on one recording (camera and/or microphone) into ``store``; return its counts."""
    from edge.ingest import ingest

    store.mkdir(parents=True, exist_ok=True)
    summary = ingest(video=str(video) if video else None, audio=str(audio) if audio else None, store=str(store),
                     label=int(label))
    return dict(summary) if isinstance(summary, dict) else dict(vars(summary))


def store_arrays(store: Path, *, image_size: int, n_mels: int, frames: int) -> dict[str, np.ndarray]:
    """Every sample of a SampleStore (all splits) as arrays in the layout of :mod:`common.training`."""
    from edge.store import SampleStore

    s = SampleStore(store)
    try:
        parts = [s.load_arrays(image_size=image_size, n_mels=n_mels, frames=frames, split=split)
                 for split in ("train", "eval")]
    finally:
        close = getattr(s, "close", None)
        if close is not None:
            close()
    parts = [p for p in parts if len(p["label"])]
    if not parts:
        raise ValueError(f"store {store} holds no samples")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
