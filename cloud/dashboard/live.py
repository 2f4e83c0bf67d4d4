"""The live state of a running federation: one object the aggregation loop feeds with what it already knows.

The loop reports its events (a node dispatched, an update accepted or refused and why, a version made and its
accuracy, a global-training run, a base published); :class:`LiveState` keeps counters, one row per device and
bounded histories, and hands out JSON snapshots (:meth:`LiveState.snapshot`, the body of ``/api/state``). The
web page, ``/metrics``, ``fedge status`` and live TensorBoard all read it, so they never disagree. Every method
takes one lock for a few dictionary updates: the loop pays next to nothing when nobody watches.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fedge.common import wire
from fedge.common.run_log import VersionRecord

__all__ = ["FUSED", "SCHEMA_VERSION", "DeviceRow", "Listener", "LiveEvent", "LiveState"]

SCHEMA_VERSION = 1
FUSED = "fused"  # the accuracy of all present modalities together, beside the per-modality subsets
Listener = Callable[[VersionRecord], None]


class LiveEvent(StrEnum):
    """The kinds of the live state's events (``/api/state``'s ``events``); the page words each one."""

    TRAINING = "training"  # a global-training run made a new base (base_version, version, steps, seconds)
    TRAINING_FAILED = "training_failed"  # ... failed (version, error)
    PUBLISHED = "published"  # a base was published (base_version, model)


@dataclass
class DeviceRow:
    """One device (Flower node) as the aggregator sees it."""

    id: int
    partition: int = -1  # the simulated device's partition id (-1: unknown, e.g. in deployment)
    modalities: list[str] = field(default_factory=list)
    state: str = "idle"  # training | idle | lost
    base_version: int | None = None  # the version it trains on (the last one dispatched to it)
    accepted: int = 0
    refused: int = 0
    last_reason: str | None = None
    last_staleness: int | None = None
    last_seen: float = 0.0  # Unix time of its last dispatch or reply
    bytes_up: int = 0
    bytes_down: int = 0

    def as_json(self) -> dict[str, Any]:
        """The row for ``/api/state`` (``dataclasses.asdict`` deep-copies and costs ~100x more per row)."""
        return {"id": str(self.id), "partition": self.partition, "modalities": list(self.modalities),
                "state": self.state, "base_version": self.base_version, "accepted": self.accepted,
                "refused": self.refused, "last_reason": self.last_reason, "last_staleness": self.last_staleness,
                "last_seen": self.last_seen, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class LiveState:
    """Counters, device rows and histories of one aggregator run, safe to read from other threads.

    Parameters
    ----------
    mode, buffer_size, concurrency, target_versions, clock:
        How the federation aggregates (``async`` K/C or ``sync``) and towards how many versions; ``clock``
        is ``virtual`` or ``real``.
    history:
        How many version records and events are kept (older ones drop off; counters stay exact).
    """

    def __init__(self, *, mode: str, buffer_size: int, concurrency: int, target_versions: int,
                 clock: str = "real", history: int = 1000) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.seq = 0  # bumped on every change; SSE streams wait on it
        self.started_at = time.time()
        self.mode, self.buffer_size, self.concurrency = mode, buffer_size, concurrency
        self.target_versions, self.clock = target_versions, clock
        self.running = True
        self.version = 0
        self.base_version = 0
        self.buffered = 0
        self.clock_time = 0.0
        self.devices: dict[int, DeviceRow] = {}
        self.accepted = 0
        self.rejections: dict[str, int] = {}
        self.bytes = {"up": 0, "down": 0}
        self.staleness: dict[int, int] = {}  # staleness -> accepted updates
        self.versions: deque[dict[str, Any]] = deque(maxlen=history)  # one per evaluated version
        self.version_times: deque[tuple[int, float]] = deque(maxlen=64)  # (version, wall time): the rate
        self.events: deque[dict[str, Any]] = deque(maxlen=history)  # global training, published bases
        self.links: dict[str, str] = {}  # e.g. the Ray dashboard's URL
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ fed by the loop
    def on_version(self, fn: Listener) -> None:
        """Call ``fn(record)`` (outside the lock, in the loop's thread) for every evaluated version."""
        self._listeners.append(fn)

    def started(self, version: int, base_version: int = 0) -> None:
        with self._changed:
            self.version, self.base_version = version, base_version
            self.version_times.append((version, time.time()))
            self._bump()

    def link(self, name: str, url: str) -> None:
        """Show a related page (``ray`` -> the Ray dashboard)."""
        with self._changed:
            self.links[name] = url
            self._bump()

    def nodes(self, present: Iterable[int], partitions: Mapping[int, int] | None = None) -> None:
        """The nodes connected now: new ones appear idle, absent ones become ``lost``."""
        ids = {int(n) for n in present}
        with self._changed:
            changed = False
            for n in ids:
                row = self.devices.get(n)
                if row is None:
                    row = self.devices[n] = DeviceRow(id=n)
                    changed = True
                elif row.state == "lost":
                    row.state, changed = "idle", True
                pid = (partitions or {}).get(n)
                if pid is not None and pid != row.partition:
                    row.partition, changed = int(pid), True
            for n, row in self.devices.items():
                if n not in ids and row.state != "lost":
                    row.state, changed = "lost", True
            if changed:
                self._bump()

    def dispatched(self, node: int, version: int, bytes_down: int) -> None:
        with self._changed:
            row = self._row(node)
            row.state, row.base_version, row.last_seen = "training", version, time.time()
            row.bytes_down += bytes_down
            self.bytes["down"] += bytes_down
            self._bump()

    def accepted_update(self, node: int, *, staleness: int, bytes_up: int,
                        metrics: Mapping[str, float] | None = None) -> None:
        with self._changed:
            row = self._reply(node, metrics)
            row.accepted += 1
            row.last_staleness, row.last_reason = int(staleness), None
            row.bytes_up += bytes_up
            self.accepted += 1
            self.buffered += 1
            self.bytes["up"] += bytes_up
            self.staleness[int(staleness)] = self.staleness.get(int(staleness), 0) + 1
            self._bump()

    def refused_update(self, node: int, reason: str, *, staleness: int | None = None, lost: bool = False,
                       metrics: Mapping[str, float] | None = None) -> None:
        """An update refused (or lost: timeout, node left) with its reason."""
        with self._changed:
            row = self._reply(node, metrics)
            row.refused += 1
            row.last_reason = reason
            if staleness is not None and staleness >= 0:
                row.last_staleness = int(staleness)
            if lost:
                row.state = "lost"
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
            self._bump()

    def new_version(self, version: int, clock_time: float, record: VersionRecord | None = None) -> None:
        """A version was made (the buffer was applied); ``record``: its evaluation, if it comes with it."""
        with self._changed:
            self.version, self.clock_time, self.buffered = int(version), float(clock_time), 0
            self.version_times.append((self.version, time.time()))
            self._bump()
        if record is not None:
            self.evaluated(record)

    def evaluated(self, record: VersionRecord) -> None:
        """A version's evaluation: its ``metrics.jsonl`` record."""
        with self._changed:
            acc: dict[str, Any] = {FUSED: record.accuracy, **record.modality_accuracy}
            # JSON has no NaN: a figure that is not a finite number is left out (loss: null)
            self.versions.append({
                "version": record.version, "time": self.clock_time, "wall": time.time(),
                "accuracy": {k: float(v) for k, v in acc.items() if _finite(v)},
                "loss": record.loss if _finite(record.loss) else None,
                "updates": record.updates or 0})
            self._bump()
        for fn in self._listeners:
            fn(record)

    def event(self, kind: LiveEvent | str, **fields: Any) -> None:
        """A global-training run, a published base (:class:`LiveEvent`) or another event."""
        with self._changed:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
            self.events.append({"kind": str(kind), "wall": time.time(), **clean})
            if "base_version" in fields and kind == LiveEvent.PUBLISHED:
                self.base_version = int(fields["base_version"])
            self._bump()

    def finished(self) -> None:
        with self._changed:
            self.running = False
            for row in self.devices.values():
                if row.state == "training":
                    row.state = "idle"
            self._bump()

    # ------------------------------------------------------------------ read by the views
    def wait(self, seen: int, timeout: float) -> int:
        """Block until the state changed after ``seen`` (or ``timeout`` s); return the current sequence."""
        with self._changed:
            if self.seq == seen:
                self._changed.wait(timeout)
            return self.seq

    def snapshot(self) -> dict[str, Any]:
        """The whole state as JSON-ready data (``cloud/dashboard/static/state.schema.json``)."""
        with self._lock:
            now = time.time()
            states = {"training": 0, "idle": 0, "lost": 0}
            for row in self.devices.values():
                states[row.state] = states.get(row.state, 0) + 1
            return {
                "schema": SCHEMA_VERSION,
                "seq": self.seq,
                "now": now,
                "running": self.running,
                "federation": {
                    "mode": self.mode, "buffer_size": self.buffer_size, "concurrency": self.concurrency,
                    "clock": self.clock, "version": self.version, "target_versions": self.target_versions,
                    "base_version": self.base_version, "buffered": self.buffered,
                    "versions_per_minute": self._rate(), "clock_time": self.clock_time,
                    "uptime_s": now - self.started_at, "accepted": self.accepted,
                    "refused": sum(self.rejections.values()),
                },
                "bytes": dict(self.bytes),
                "rejections": dict(sorted(self.rejections.items())),
                "staleness": [{"staleness": s, "count": c} for s, c in sorted(self.staleness.items())],
                # node ids are 64-bit: as strings, since a JavaScript number holds only 53 bits exactly
                "devices": [r.as_json() for r in sorted(self.devices.values(), key=lambda r: r.id)],
                "device_states": states,
                "versions": list(self.versions),
                "events": list(self.events),
                "links": dict(self.links),
            }

    # ------------------------------------------------------------------ internals
    def _rate(self) -> float:
        """Versions per minute over the recent versions (wall clock)."""
        if len(self.version_times) < 2:
            return 0.0
        (v0, t0), (v1, t1) = self.version_times[0], self.version_times[-1]
        return 60.0 * (v1 - v0) / (t1 - t0) if t1 - t0 >= 1.0 else 0.0  # no rate from a sub-second burst

    def _row(self, node: int) -> DeviceRow:
        row = self.devices.get(int(node))
        if row is None:
            row = self.devices[int(node)] = DeviceRow(id=int(node))
        return row

    def _reply(self, node: int, metrics: Mapping[str, float] | None) -> DeviceRow:
        row = self._row(node)
        row.state, row.last_seen = "idle", time.time()
        if metrics:
            mods = sorted(k[len(wire.COUNT_PREFIX):] for k, v in metrics.items()
                          if k.startswith(wire.COUNT_PREFIX) and float(v) > 0)
            if mods:
                row.modalities = mods
            pid = metrics.get(wire.PARTITION_ID)
            if pid is not None and float(pid) >= 0:
                row.partition = int(pid)
        return row

    def _bump(self) -> None:
        self.seq += 1
        self._changed.notify_all()
