"""Prometheus exposition of the aggregator's live state (``GET /metrics`` of the dashboard server).

A custom collector reads :class:`fedge.cloud.dashboard.live.LiveState` at scrape time, so there is no second set of
counters to keep in step with the loop. Metric names: ``fedge_global_version``,
``fedge_updates_total{outcome,reason}``, ``fedge_staleness`` (histogram of accepted updates),
``fedge_devices{state}``, ``fedge_bytes_total{direction}``, ``fedge_accuracy{modality}``, plus
``fedge_buffer_fill``, ``fedge_buffer_size`` and ``fedge_versions_per_minute``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .dashboard.live import LiveState

__all__ = [
    "CONTENT_TYPE",
    "STALENESS_BUCKETS",
    "LiveCollector",
    "exposition",
    "families",
    "registry_for",
    "staleness_buckets",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21)  # versions behind at arrival; +Inf is added


def staleness_buckets(counts: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative histogram buckets ``[(le, count)]`` (with ``+Inf``) and the sum of staleness values."""
    out: list[tuple[str, float]] = []
    for le in STALENESS_BUCKETS:
        out.append((str(float(le)), float(sum(c for s, c in counts.items() if s <= le))))
    out.append(("+Inf", float(sum(counts.values()))))
    return out, float(sum(s * c for s, c in counts.items()))


def families(state: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one :meth:`LiveState.snapshot`."""
    fed = state["federation"]
    out: list[Metric] = []
    g = GaugeMetricFamily("fedge_global_version", "Current global model version.")
    g.add_metric([], fed["version"])
    out.append(g)
    upd = CounterMetricFamily("fedge_updates", "Device updates by outcome and refusal reason.",
                              labels=["outcome", "reason"])
    upd.add_metric(["accepted", ""], fed["accepted"])
    for reason, n in state["rejections"].items():
        upd.add_metric(["refused", reason], n)
    out.append(upd)
    counts = {int(s["staleness"]): int(s["count"]) for s in state["staleness"]}
    buckets, total = staleness_buckets(counts)
    out.append(HistogramMetricFamily("fedge_staleness", "Staleness (versions behind) of accepted updates.",
                                     buckets=buckets, sum_value=total))
    dev = GaugeMetricFamily("fedge_devices", "Devices by state.", labels=["state"])
    for st, n in sorted(state["device_states"].items()):
        dev.add_metric([st], n)
    out.append(dev)
    by = CounterMetricFamily("fedge_bytes", "Bytes of adapters sent to devices (down) and accepted from them "
                             "(up).", labels=["direction"])
    for d, n in sorted(state["bytes"].items()):
        by.add_metric([d], n)
    out.append(by)
    acc = GaugeMetricFamily("fedge_accuracy", "Held-out accuracy of the newest evaluated version, fused and per "
                            "modality subset.", labels=["modality"])
    if state["versions"]:
        for m, a in sorted(state["versions"][-1]["accuracy"].items()):
            acc.add_metric([m], a)
    out.append(acc)
    for name, key, doc in (("fedge_buffer_fill", "buffered", "Accepted updates waiting in the buffer."),
                           ("fedge_buffer_size", "buffer_size", "Updates per version (K)."),
                           ("fedge_versions_per_minute", "versions_per_minute", "Recent version rate.")):
        m = GaugeMetricFamily(name, doc)
        m.add_metric([], fed[key])
        out.append(m)
    return out


class LiveCollector(Collector):
    """Collects :func:`families` from a live state at every scrape."""

    def __init__(self, live: LiveState) -> None:
        self.live = live

    def collect(self) -> Iterator[Metric]:
        yield from families(self.live.snapshot())


def registry_for(live: LiveState) -> CollectorRegistry:
    """A registry of its own (not the process-global one) holding the live collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LiveCollector(live))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format of ``registry``."""
    return generate_latest(registry)
