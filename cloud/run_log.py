"""The server's record of a run: ``events.jsonl``, one ``metrics.jsonl`` record and one ``[fedge] version N`` line
per evaluated version, and the final adapters and summary.

The records are the contract of :mod:`fedge.common.run_log`; here the server's side: nothing is written without a
run directory, and the console line of a version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.run_log import VersionRecord, append_event, append_version

__all__ = ["VersionAcc", "event", "metrics_record", "save_final", "version_line"]


@dataclass
class VersionAcc:
    """What went into the versions since the last metrics record."""

    updates: int = 0
    upload_bytes: int = 0
    staleness: list[int] = field(default_factory=list)


def event(run_dir: Path | None, event: str, **fields: Any) -> None:
    """Append the event ``event`` and its fields to ``<run_dir>/events.jsonl``; nothing without a run dir."""
    if run_dir:
        append_event(run_dir, event, **fields)


def metrics_record(run_dir: Path | None, rec: VersionRecord) -> None:
    """Append one version's record to ``<run_dir>/metrics.jsonl``; nothing without a run dir."""
    if run_dir:
        append_version(run_dir, rec)


def version_line(rec: VersionRecord, *, t: float, virtual: bool) -> str:
    """The ``[fedge] version N ...`` line of a version's record (accuracy and loss ``-`` when not evaluated)."""
    stale = f"{np.mean(rec.staleness):.1f}" if rec.staleness else "-"
    acc = (f"accuracy {rec.accuracy:.3f}  loss {rec.loss:.3f}" if rec.accuracy is not None and rec.loss is not None
           else "accuracy -  loss -")
    return (f"[fedge] version {rec.version:3d}  {acc}  "
            f"t {t:8.1f}s{'(virtual)' if virtual else ''}  updates {rec.updates}  "
            f"staleness {stale}  rejected {sum((rec.rejected or {}).values())}  "
            f"uploaded {(rec.upload_bytes or 0) / 1024:.1f} KiB")


def save_final(run_dir: Path, params: dict[str, Any], summary: dict[str, Any]) -> None:
    """The final adapters (``global_adapters.npz``) and the run's counters (``summary.json``)."""
    np.savez(run_dir / "global_adapters.npz", **params)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
