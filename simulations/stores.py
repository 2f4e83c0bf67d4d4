"""The simulation's use of the edge data path: ingest a rendered stream into a SampleStore, read a store back.

Thin glue over :mod:`fedge.edge.ingest` and :mod:`fedge.edge.store` (the code a device runs), so that simulated devices
get their samples through keyframe extraction, log-mel features, alignment and the quality gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.config import FedgeConfig

__all__ = ["ingest_options", "ingest_stream", "store_arrays"]


def ingest_options(cfg: FedgeConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`ingest_stream` that come from the run config (picklable).

    The microphone-only stride is the shot length, so a mic-only device stores about one window per shot,
    like a camera device stores about one keyframe per shot.
    """
    m = cfg.model
    return {"n_mels": m.n_mels, "frames": m.audio_frames, "mic_stride": cfg.simulation.shot_seconds}


def ingest_stream(*, video: Path | None, audio: Path | None, store: Path, label: int, n_mels: int, frames: int,
                  mic_stride: float, split: str = "train") -> dict[str, Any]:
    """Run the edge ingest on one recording (camera and/or microphone) into ``store``; return its counts.

    Raises
    ------
    RuntimeError
        The ingest stopped with an error (one line, from the ingest report).
    """
    from fedge.edge.ingest import ingest

    store.mkdir(parents=True, exist_ok=True)
    rep = ingest(video=video, audio=audio, store=store, label=int(label), split=split, n_mels=n_mels,
                 frames=frames, mic_stride=mic_stride, audio_from_video=False)
    if rep.error:
        raise RuntimeError(f"ingest of {video or audio}: {rep.error}")
    out: dict[str, Any] = {k: v for k, v in rep.to_json().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in
                           ("first_id", "last_id")}
    for reason, n in rep.rejected.items():
        out[f"rejected {reason}"] = n
    return out


def store_arrays(store: Path, *, image_size: int, n_mels: int, frames: int) -> dict[str, np.ndarray]:
    """Every labelled sample of a SampleStore (all splits) as arrays in the layout of :mod:`fedge.common.training`."""
    from fedge.edge.store import SampleStore

    with SampleStore(store) as s:
        arrays = s.load_arrays(image_size=image_size, n_mels=n_mels, frames=frames, split=None)
    keep = arrays["label"] >= 0
    if not keep.any():
        raise ValueError(f"store {store} holds no labelled samples")
    return {k: v[keep] for k, v in arrays.items()}
