"""What the ServerApp starts to be watched: the live state, the dashboard server and live TensorBoard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedge.common.config import DashboardConfig

from .http import DashboardError, DashboardServer, start_dashboard
from .live import LiveState
from .tensorboard import TB_SUBDIR, LiveTensorBoard

__all__ = ["Watch", "watch"]

log = logging.getLogger("fedge.dashboard")


@dataclass
class Watch:
    """The live state and the views that read it; :meth:`close` ends them when the run ends."""

    live: LiveState
    server: DashboardServer | None = None
    tensorboard: LiveTensorBoard | None = None

    def close(self) -> None:
        self.live.finished()
        if self.server is not None:
            self.server.stop()  # after the pages got the final state
        if self.tensorboard is not None:
            self.tensorboard.close()


def watch(dash: DashboardConfig, *, run_dir: Path | None, mode: str, buffer_size: int, concurrency: int,
          target_versions: int, clock: str) -> Watch:
    """Start the views ``dash`` asks for. A dashboard that cannot start is reported; the federation goes on."""
    w = Watch(LiveState(mode=mode, buffer_size=buffer_size, concurrency=concurrency,
                        target_versions=target_versions, clock=clock))
    if dash.tensorboard and run_dir is not None:
        w.tensorboard = LiveTensorBoard(run_dir / TB_SUBDIR)
        w.live.on_version(w.tensorboard)
    if dash.address:
        try:
            w.server = start_dashboard(w.live, dash.address, public=dash.public,
                                       tokens_file=dash.tokens_file or None)
        except DashboardError as e:
            log.error("no dashboard: %s", e)
        else:
            print(f"[fedge] dashboard: {w.server.url}", flush=True)
    return w
