"""The run log contract: one ``metrics.jsonl`` record per evaluated global version, one ``events.jsonl`` record per
server event, and the one reader and writer of both files.

The server (and the plain-Flower peer of the benchmarks) writes these records; the report, the comparison, the
progress bar, the dashboard, TensorBoard and the benchmarks read them. Each file is JSON lines appended with
:func:`fedge.common.fsio.append_jsonl`; a line torn by a killed writer is skipped on read. Keys that this contract
does not name are kept (:attr:`VersionRecord.extra`, :attr:`RunEvent.fields`), so older and newer logs still read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .fsio import append_jsonl, read_jsonl
from .wire import ACC_PREFIX

__all__ = ["EVENT_LOG", "VERSION_LOG", "Event", "RunEvent", "RunLogError", "VersionRecord", "append_event",
           "append_version", "read_events", "read_versions"]

VERSION_LOG = "metrics.jsonl"  # in the run directory: one VersionRecord per evaluated version
EVENT_LOG = "events.jsonl"  # in the run directory: one RunEvent per server event
_EVENT = "event"  # the key of an event's name in its JSON line


class Event(StrEnum):
    """The names of the server's events (``RunEvent.event``); a name outside them still reads back."""

    STARTED = "started"  # the server loop started (version, ray, mode)
    RESUMED = "resumed"  # ... from a checkpoint (version, recovery_s, ray)
    STOPPED = "stopped"  # the loop ended (checkpoint and the aggregator's counters)
    NO_EVAL_SET = "no_eval_set"  # no held-out set: versions are not evaluated
    GLOBAL_TRAINING = "global_training"  # a Ray Train run made a new base (base_version, version, steps...)
    GLOBAL_TRAINING_FAILED = "global_training_failed"
    PUBLISHED = "published"  # a base was published to the shard store (base_version, model, serial)
    PUBLISH_FAILED = "publish_failed"
    SECAGG_GROUP = "secagg_group"  # a secure group was unmasked (members, senders, holders, threshold, version)
    SECAGG_DISCARDED = "secagg_discarded"  # a secure group could not be unmasked (senders, error)


class RunLogError(ValueError):
    """A run log record that breaks the contract (a typed key of the wrong type, no version, no event name)."""


def _int(key: str, v: Any) -> int:
    # an integral float (100.0) is accepted: older writers and hand-written logs give byte counts as floats
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise RunLogError(f"run log record: {key!r} must be an integer, got {v!r}")
    return int(v)


def _float(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RunLogError(f"run log record: {key!r} must be a number, got {v!r}")
    return float(v)


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise RunLogError(f"run log record: {key!r} must be a string, got {v!r}")
    return v


def _staleness(key: str, v: Any) -> list[int]:
    if isinstance(v, Mapping):  # a histogram {staleness: count}, as some older servers wrote it (JSON keys: str)
        try:
            hist = {int(s): _int(key, n) for s, n in v.items()}
        except (TypeError, ValueError) as e:
            raise RunLogError(f"run log record: {key!r} must map staleness to counts, got {v!r}") from e
        return [s for s, n in hist.items() for _ in range(n)]
    if not isinstance(v, list):
        raise RunLogError(f"run log record: {key!r} must be a list of integers, got {v!r}")
    return [_int(key, s) for s in v]


def _counts(key: str, v: Any) -> dict[str, int]:
    if not isinstance(v, Mapping):
        raise RunLogError(f"run log record: {key!r} must map reasons to counts, got {v!r}")
    return {str(k): _int(key, n) for k, n in v.items()}


# how each typed field of VersionRecord reads from JSON (None is "absent" and never read)
_READ = {"version": _int, "accuracy": _float, "loss": _float, "updates": _int, "upload_bytes": _int,
         "virtual_time": _float, "real_time": _float, "wall_time": _float, "bytes_sent": _int, "bytes_down": _int,
         "staleness": _staleness, "rejected": _counts, "inflight": _int, "mode": _str}


@dataclass(frozen=True, kw_only=True)
class VersionRecord:
    """One ``metrics.jsonl`` line: a global version, its evaluation and what went into it.

    Every field but ``version`` may be absent (``None``; left out of the JSON line): the Flower peer writes only
    ``version``, ``accuracy``, ``loss``, ``updates`` and ``wall_time``, and a server without an evaluation set no
    ``accuracy``. Counters that say "since the last record" cover the versions since the previous line, because
    the server records every ``aggregation.eval_every`` versions.
    """

    version: int
    accuracy: float | None = None  # held-out accuracy, all present modalities fused
    loss: float | None = None  # held-out cross-entropy
    # accuracy per modality subset of the held-out set ("image", "audio", "image+audio"): JSON keys "acc-<subset>"
    modality_accuracy: dict[str, float] = field(default_factory=dict)
    updates: int | None = None  # accepted updates since the last record
    upload_bytes: int | None = None  # their payload bytes
    virtual_time: float | None = None  # clock seconds when the clock is virtual (simulation)...
    real_time: float | None = None  # ...or real (deployment): a server writes one of the two
    wall_time: float | None = None  # seconds since the server loop (or the peer) started
    bytes_sent: int | None = None  # accepted upload bytes, cumulative
    bytes_down: int | None = None  # adapter bytes sent to devices, cumulative
    staleness: list[int] | None = None  # the staleness of each update accepted since the last record
    rejected: dict[str, int] | None = None  # refused updates by reason, cumulative
    inflight: int | None = None  # TRAIN messages out when the record was made
    mode: str | None = None  # aggregation.mode: "async" or "sync"
    extra: dict[str, Any] = field(default_factory=dict)  # keys this contract does not name, kept as read

    def __post_init__(self) -> None:
        for k in self.extra:
            if k in _READ or k.startswith(ACC_PREFIX):
                raise RunLogError(f"VersionRecord.extra: {k!r} is a field of the record, not an extra key")

    @property
    def clock_time(self) -> float | None:
        """The clock time of the version: virtual under simulation, real in deployment (None: not recorded)."""
        return self.virtual_time if self.virtual_time is not None else self.real_time

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of the line: absent fields left out, ``acc-<subset>`` after ``loss``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "modality_accuracy":
                out.update({f"{ACC_PREFIX}{k}": x for k, x in v.items()})
            elif f.name == "extra":
                out.update(v)
            elif v is not None:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> VersionRecord:
        """Read one line's object; a typed key of the wrong type fails naming it, unknown keys go to ``extra``."""
        if obj.get("version") is None:
            raise RunLogError(f"run log record without 'version': {dict(obj)!r:.200}")
        typed: dict[str, Any] = {}
        per_mod: dict[str, float] = {}
        extra: dict[str, Any] = {}
        for k, v in obj.items():
            if k in _READ:
                typed[k] = None if v is None else _READ[k](k, v)
            elif k.startswith(ACC_PREFIX):
                per_mod[k[len(ACC_PREFIX):]] = _float(k, v)
            else:
                extra[k] = v
        return cls(**typed, modality_accuracy=per_mod, extra=extra)

    def scalars(self) -> dict[str, float]:
        """The plottable numbers of the record: finite numbers other than the version, under their JSON keys."""
        return {k: float(v) for k, v in self.to_json().items()
                if k != "version" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass(frozen=True)
class RunEvent:
    """One ``events.jsonl`` line: the event's name (``started``, ``secagg_group``...) and its fields."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if _EVENT in self.fields:
            raise RunLogError(f"RunEvent.fields: {_EVENT!r} is the event's name, not a field")

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of the line: ``event`` first, then the fields."""
        return {_EVENT: self.event, **self.fields}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RunEvent:
        """Read one line's object; every key but ``event`` is a field."""
        if not isinstance(obj.get(_EVENT), str):
            raise RunLogError(f"run log event without an {_EVENT!r} name: {dict(obj)!r:.200}")
        return cls(obj[_EVENT], {k: v for k, v in obj.items() if k != _EVENT})


def _log(path_or_run_dir: str | Path, name: str) -> Path:
    p = Path(path_or_run_dir)
    return p / name if p.is_dir() else p


def append_version(run_dir: str | Path, rec: VersionRecord) -> None:
    """Append ``rec`` to ``<run_dir>/metrics.jsonl`` (fsync'd; created with its folder if need be)."""
    append_jsonl(Path(run_dir) / VERSION_LOG, rec.to_json())


def read_versions(path_or_run_dir: str | Path) -> list[VersionRecord]:
    """The version records of a run directory's ``metrics.jsonl`` (or of that file), in order.

    Empty when the file does not exist; a line torn by a killed writer is skipped (:func:`fedge.common.fsio.read_jsonl`).
    """
    return [VersionRecord.from_json(r) for r in read_jsonl(_log(path_or_run_dir, VERSION_LOG))]


def append_event(run_dir: str | Path, event: str, /, **fields: Any) -> None:
    """Append the event ``event`` with ``fields`` to ``<run_dir>/events.jsonl``."""
    append_jsonl(Path(run_dir) / EVENT_LOG, RunEvent(event, fields).to_json())


def read_events(path_or_run_dir: str | Path) -> list[RunEvent]:
    """The events of a run directory's ``events.jsonl`` (or of that file), in order; torn lines skipped."""
    return [RunEvent.from_json(r) for r in read_jsonl(_log(path_or_run_dir, EVENT_LOG))]
