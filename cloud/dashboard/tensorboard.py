"""Live TensorBoard: one set of scalars per evaluated version, written into ``run_dir/tb`` while the run goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedge.common.run_log import VersionRecord

__all__ = ["TB_SUBDIR", "LiveTensorBoard", "has_events", "scalars"]

TB_SUBDIR = "tb"


def scalars(record: VersionRecord) -> dict[str, float]:
    """The TensorBoard scalars of a version record: its finite numbers but the version, tags without '-'."""
    return {k.replace("-", "_"): v for k, v in record.scalars().items()}


def has_events(log_dir: str | Path) -> bool:
    """Whether ``log_dir`` already holds TensorBoard event files (written live by the ServerApp)."""
    d = Path(log_dir)
    return d.is_dir() and any(d.glob("events.out.tfevents.*"))


class LiveTensorBoard:
    """A ``SummaryWriter`` fed by :meth:`fedge.cloud.dashboard.live.LiveState.on_version`, flushed per version."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w: Any = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: VersionRecord) -> None:
        for k, v in scalars(record).items():
            self._w.add_scalar(k, v, record.version)
        self._w.flush()

    def close(self) -> None:
        self._w.close()
