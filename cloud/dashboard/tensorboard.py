"""Live TensorBoard: one set of scalars per evaluated version, written into ``run_dir/tb`` while the run goes on."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TB_SUBDIR", "LiveTensorBoard", "has_events", "scalars"]

TB_SUBDIR = "tb"


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The plottable scalars of a ``metrics.jsonl`` record (numbers other than the version; tags without '-')."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "version" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k.replace("-", "_")] = float(v)
    return out


def has_events(log_dir: str | Path) -> bool:
    """Whether ``log_dir`` already holds TensorBoard event files (written live by the ServerApp)."""
    d = Path(log_dir)
    return d.is_dir() and any(d.glob("events.out.tfevents.*"))


class LiveTensorBoard:
    """A ``SummaryWriter`` fed by :meth:`fedge.cloud.dashboard.live.LiveState.on_version`, flushed per version."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w: Any = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: Mapping[str, Any]) -> None:
        step = int(record["version"])
        for k, v in scalars(record).items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()
