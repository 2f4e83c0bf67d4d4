"""Validation of client updates before they can touch the global model.

An update is accepted only if its reply carries the records of the wire contract, its payload decodes
(:mod:`fedge.common.codec`), its base version is one the server produced on the current base, its tensors have
exactly the global adapters' names and shapes, every value is finite, and its L2 norm is within the bound
(clipped or rejected, as configured). Every refusal raises :class:`UpdateRejected` with a
:class:`Reason`; :class:`RejectionCounter` keeps the per-reason counts that the server reports.
Pure: no Flower transport, no Ray, no I/O.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.common import codec, wire

from .aggregation import State, clip_by_norm, global_norm

__all__ = [
    "RawUpdate",
    "Reason",
    "RejectionCounter",
    "UpdateRejected",
    "ValidUpdate",
    "extract",
    "max_payload_bytes",
    "validate",
]


class Reason(str, enum.Enum):
    """Why an update was refused (the keys of the rejection counters)."""

    REPLY_ERROR = "reply_error"  # the node answered with an error instead of an update
    MALFORMED = "malformed"  # records or keys of the wire contract missing or of the wrong type
    DECODE = "decode"  # the codec payload does not decode
    OVERSIZED_PAYLOAD = "oversized_payload"  # more bytes than any honest encoding of the adapters
    UNKNOWN_VERSION = "unknown_version"  # base version never produced (or produced on an older base)
    STALE = "stale"  # staleness above aggregation.max_staleness
    KEYS = "keys"  # adapter names differ
    SHAPE = "shape"  # a tensor's shape differs
    NONFINITE = "nonfinite"  # NaN or Inf
    NORM = "norm"  # norm above aggregation.max_norm with norm_action = "reject"
    TIMEOUT = "timeout"  # no reply within aggregation.reply_timeout_s (a lost update, counted alike)
    NODE_LEFT = "node_left"  # the node left the federation while training
    INVALID = "invalid"  # any other failure while checking the update (e.g. out of memory): refused, counted
    VERSION_MISMATCH = "version_mismatch"  # the claimed base version is not the one the server sent that node
    REPLAY = "replay"  # the very payload of an update already accepted
    SECAGG_INVALID = "secagg_invalid"  # a masked update or its shares malformed (secure aggregation)
    SECAGG_ALONE = "secagg_alone"  # its group kept fewer than two senders: never unmasked alone
    SECAGG_DISCARDED = "secagg_discarded"  # its group's sum failed to unmask or its checks (a share, a mask lied)


class UpdateRejected(ValueError):
    """An update was refused; ``reason`` says why, the message gives details."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RejectionCounter:
    """Per-reason counts of refused updates."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: Reason) -> None:
        self.counts[reason.value] = self.counts.get(reason.value, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


@dataclass(frozen=True)
class ValidUpdate:
    """An accepted update: the decoded delta (float32, maybe clipped) and what the server needs about it."""

    delta: State
    base_version: int
    staleness: int
    num_examples: float
    norm: float  # before clipping
    clipped: bool
    upload_bytes: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class RawUpdate:
    """The fields of a TRAIN reply, taken out of its records (see :func:`extract`)."""

    payload: bytes
    base_version: int
    metrics: dict[str, float]


def extract(content: Any) -> RawUpdate:
    """Take payload, base version and metrics out of a reply's ``RecordDict``.

    Raises :class:`UpdateRejected` (``MALFORMED``) when a record or key of the wire contract is missing or
    of the wrong type.
    """
    try:
        upd = content[wire.UPDATE]
        payload = upd[wire.DELTA]
        base = upd[wire.BASE_VERSION]
    except (KeyError, TypeError) as e:
        raise UpdateRejected(Reason.MALFORMED, f"reply lacks {e}") from None
    if not isinstance(payload, (bytes, bytearray)):
        raise UpdateRejected(Reason.MALFORMED, f"'{wire.DELTA}' is {type(payload).__name__}, not bytes")
    if isinstance(base, bool) or not isinstance(base, int):
        raise UpdateRejected(Reason.MALFORMED, f"'{wire.BASE_VERSION}' is {base!r}, not an integer")
    metrics: dict[str, float] = {}
    try:
        if wire.METRICS in content:
            metrics = {str(k): float(v) for k, v in content[wire.METRICS].items()
                       if isinstance(v, (int, float))}
    except (TypeError, ValueError, AttributeError) as e:
        raise UpdateRejected(Reason.MALFORMED, f"metrics unreadable: {e}") from None
    return RawUpdate(payload=bytes(payload), base_version=int(base), metrics=metrics)


def max_payload_bytes(reference: Mapping[str, np.ndarray]) -> int:
    """The largest payload an honest client can send: dense float32 values + full indices + a header."""
    n = sum(int(np.asarray(v).size) for v in reference.values())
    return 10 * n + 64 * len(reference) + 65_536


def validate(
    raw: RawUpdate,
    *,
    reference: Mapping[str, np.ndarray],
    current_version: int,
    oldest_version: int,
    max_staleness: int,
    max_norm: float,
    norm_action: str = "clip",
    dispatched_version: int | None = None,
) -> ValidUpdate:
    """Check one update against the global adapters ``reference`` and the version window.

    ``oldest_version`` is the first version produced on the current base (see
    :meth:`fedge.cloud.state.AggregatorState.rebase`); base versions outside ``[oldest_version, current_version]``
    are unknown. ``dispatched_version`` is the version the server sent to this node: a claim that differs is
    refused (a client claiming a newer base would escape its staleness weight). Returns the decoded (and,
    with ``norm_action="clip"``, clipped) update.

    Raises
    ------
    UpdateRejected
        With the first reason that applies: size and version window first (no decoding), then the content
        (decode, keys, shapes, finiteness, norm bound), then staleness.
    """
    if len(raw.payload) > max_payload_bytes(reference):
        raise UpdateRejected(Reason.OVERSIZED_PAYLOAD,
                             f"{len(raw.payload)} bytes > {max_payload_bytes(reference)} allowed")
    b = raw.base_version
    if not oldest_version <= b <= current_version:
        raise UpdateRejected(Reason.UNKNOWN_VERSION,
                             f"base version {b} not in [{oldest_version}, {current_version}]")
    try:
        delta = codec.decode(raw.payload, expected={k: np.shape(v) for k, v in reference.items()})
    except codec.LayoutError as e:
        raise UpdateRejected(Reason.KEYS if e.field == "keys" else Reason.SHAPE, str(e)) from None
    except codec.CodecError as e:
        reason = Reason.NONFINITE if "non-finite" in str(e) else Reason.DECODE
        raise UpdateRejected(reason, str(e)) from None
    if set(delta) != set(reference):
        missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
        raise UpdateRejected(Reason.KEYS, f"missing={missing[:3]} unexpected={extra[:3]}")
    for k, ref in reference.items():
        if tuple(delta[k].shape) != tuple(np.shape(ref)):
            raise UpdateRejected(Reason.SHAPE, f"{k!r}: {tuple(delta[k].shape)} != {tuple(np.shape(ref))}")
    delta = {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}  # a float16 overflow becomes inf
    for k, v in delta.items():
        if not np.all(np.isfinite(v)):
            raise UpdateRejected(Reason.NONFINITE, f"{k!r} holds NaN or Inf")
    norm = global_norm(delta)
    if not math.isfinite(norm):
        raise UpdateRejected(Reason.NONFINITE, "norm overflows")
    clipped = False
    if norm > max_norm:
        if norm_action == "reject":
            raise UpdateRejected(Reason.NORM, f"norm {norm:.4g} > max_norm {max_norm:.4g}")
        delta, _ = clip_by_norm(delta, max_norm)
        clipped = True
    # staleness after the content checks: a poisoned or malformed update is reported as such even when it is
    # also stale (that is the signal an operator needs); decoding it is cheap, bounded by the size check above
    if dispatched_version is not None and b != dispatched_version:
        raise UpdateRejected(Reason.VERSION_MISMATCH, f"claims base version {b}, was sent {dispatched_version}")
    staleness = current_version - b
    if staleness > max_staleness:
        raise UpdateRejected(Reason.STALE, f"staleness {staleness} > max_staleness {max_staleness}")
    n = float(raw.metrics.get(wire.NUM_EXAMPLES, 1.0))
    if not math.isfinite(n) or n <= 0:
        raise UpdateRejected(Reason.MALFORMED, f"'{wire.NUM_EXAMPLES}' is {n!r}")
    return ValidUpdate(delta=delta, base_version=b, staleness=staleness, num_examples=n, norm=norm,
                       clipped=clipped, upload_bytes=len(raw.payload), metrics=raw.metrics)
