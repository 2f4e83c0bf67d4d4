"""When a reply "arrives": the real clock in deployment, a virtual clock in simulation (FedScale's method).

In simulation every device has a :class:`DeviceProfile` derived deterministically from the seed and its
partition id (compute speed, straggler slowdown, bandwidth, dropout). A TRAIN dispatched at virtual time
``t`` to a device arrives at ``t + download + compute + upload`` (:func:`arrival_time`). The real ClientApp
computes the update; :class:`ArrivalQueue` releases replies in *virtual*-time order: an arrived reply is
applied only once no message still in flight could arrive earlier (each in-flight message has a lower bound
on its arrival, at least its dispatch time). With the real clock replies are released as they come.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ArrivalQueue", "DeviceProfile", "RealClock", "VirtualClock", "arrival_time", "device_profile", "dropped"]


@dataclass(frozen=True)
class DeviceProfile:
    """A simulated device: ``step_s`` virtual seconds per local step, link of ``bandwidth_bps`` bits/s."""

    step_s: float
    bandwidth_bps: float
    straggler: bool
    dropout: float = 0.0


def device_profile(
    partition_id: int,
    num_partitions: int,
    *,
    seed: int,
    base_step_s: float = 0.05,
    speed_sigma: float = 0.2,
    straggler_fraction: float = 0.2,
    straggler_slowdown_min: float = 5.0,
    straggler_slowdown_max: float = 10.0,
    bandwidth_mbps: float = 10.0,
    bandwidth_sigma: float = 0.3,
    dropout: float = 0.0,
) -> DeviceProfile:
    """The profile of device ``partition_id`` of ``num_partitions`` (deterministic in seed and id).

    Exactly ``round(straggler_fraction * num_partitions)`` devices are stragglers, picked by a seeded
    permutation, so two runs with the same config (e.g. async and sync) have the very same devices.
    """
    if not 0 <= partition_id < max(num_partitions, 1):
        raise ValueError(f"partition id {partition_id} not in [0, {num_partitions})")
    order = np.random.default_rng([seed, 4242]).permutation(num_partitions)
    rank = int(np.flatnonzero(order == partition_id)[0])
    straggler = rank < round(straggler_fraction * num_partitions)
    rng = np.random.default_rng([seed, 4243, partition_id])
    speed = float(np.exp(rng.normal(0.0, speed_sigma)))
    slowdown = float(rng.uniform(straggler_slowdown_min, straggler_slowdown_max)) if straggler else 1.0
    bw = bandwidth_mbps * 1e6 * float(np.exp(rng.normal(0.0, bandwidth_sigma)))
    return DeviceProfile(step_s=base_step_s * slowdown / speed, bandwidth_bps=bw, straggler=straggler,
                         dropout=dropout)


def arrival_time(dispatch_t: float, profile: DeviceProfile, *, local_steps: int, download_bytes: float,
                 upload_bytes: float) -> float:
    """Virtual time at which the reply to a TRAIN dispatched at ``dispatch_t`` reaches the server."""
    return (dispatch_t + 8.0 * download_bytes / profile.bandwidth_bps + local_steps * profile.step_s
            + 8.0 * upload_bytes / profile.bandwidth_bps)


def dropped(profile: DeviceProfile, *, seed: int, partition_id: int, dispatch_index: int) -> bool:
    """Whether this dispatch is lost (the device goes away): deterministic per (seed, device, dispatch)."""
    if profile.dropout <= 0:
        return False
    return bool(np.random.default_rng([seed, 4244, partition_id, dispatch_index]).random() < profile.dropout)


class RealClock:
    """Seconds since the server started (``offset`` continues a resumed run's time line)."""

    virtual = False

    def __init__(self, offset: float = 0.0) -> None:
        self._t0 = time.monotonic() - offset

    def now(self) -> float:
        return time.monotonic() - self._t0


class VirtualClock:
    """Virtual seconds; only :class:`ArrivalQueue` moves it, to the time of the reply it releases."""

    virtual = True

    def __init__(self, offset: float = 0.0) -> None:
        self._t = float(offset)

    def now(self) -> float:
        return self._t

    def advance_to(self, t: float) -> None:
        self._t = max(self._t, float(t))


class ArrivalQueue:
    """Orders replies for the server loop.

    ``dispatched(key, lower_bound)`` when a message goes out; ``arrived(key, t, item)`` when its reply is in
    (``t``: its arrival time, virtual or real); ``cancel(key)`` when it is given up; ``pop()`` returns the
    next ``(t, item)`` that may be applied, or ``None``. With a virtual clock that is the earliest arrived
    reply, provided that no in-flight message has a lower bound before it; the clock then moves to ``t``.
    """

    def __init__(self, clock: RealClock | VirtualClock) -> None:
        self.clock = clock
        self._inflight: dict[str, float] = {}
        self._ready: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()

    def dispatched(self, key: str, lower_bound: float) -> None:
        self._inflight[key] = float(lower_bound)

    def arrived(self, key: str, t: float, item: Any, *, order: int | None = None) -> None:
        """A reply is in; ``order`` breaks ties in ``t`` (e.g. the dispatch index), else the arrival order."""
        self._inflight.pop(key, None)
        seq = next(self._seq)
        heapq.heappush(self._ready, (float(t), seq if order is None else int(order), seq, item))

    def cancel(self, key: str) -> None:
        self._inflight.pop(key, None)

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def horizon(self) -> float:
        """The earliest time an in-flight message may still arrive (``inf`` when none is in flight)."""
        return min(self._inflight.values(), default=math.inf)

    def pop(self) -> tuple[float, Any] | None:
        if not self._ready:
            return None
        t = self._ready[0][0]
        if isinstance(self.clock, VirtualClock):
            if t > self.horizon():
                return None
            self.clock.advance_to(t)
        t, _, _, item = heapq.heappop(self._ready)
        return t, item
