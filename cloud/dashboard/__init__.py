"""Watching a federation live: the live state, its web dashboard, ``/api/state``, ``/metrics``, live TensorBoard."""

from .http import DashboardError, DashboardServer, start_dashboard
from .live import LiveEvent, LiveState
from .tensorboard import LiveTensorBoard

__all__ = ["DashboardError", "DashboardServer", "LiveEvent", "LiveState", "LiveTensorBoard", "start_dashboard"]
