"""The server's record of a run: ``events.jsonl``, one ``metrics.jsonl`` record and one ``[fedge] version N`` line
per evaluated version, and the final adapters and summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.fsio import append_jsonl

__all__ = ["VersionAcc", "event", "metrics_record", "save_final", "version_line"]


@dataclass
class VersionAcc:
    """What went into the versions since the last metrics record."""

    updates: int = 0
    upload_bytes: int = 0
    staleness: list[int] = field(default_factory=list)


def _append(run_dir: Path | None, name: str, rec: dict[str, Any]) -> None:
    if run_dir:
        append_jsonl(run_dir / name, rec)


def event(run_dir: Path | None, **rec: Any) -> None:
    """Append one event (``event=...`` and its fields) to ``<run_dir>/events.jsonl``; nothing without a run dir."""
    _append(run_dir, "events.jsonl", rec)


def metrics_record(run_dir: Path | None, rec: dict[str, Any]) -> None:
    """Append one version's record to ``<run_dir>/metrics.jsonl``; nothing without a run dir."""
    _append(run_dir, "metrics.jsonl", rec)


def version_line(rec: dict[str, Any], scores: dict[str, float], *, t: float, virtual: bool, rejected: int) -> str:
    """The ``[fedge] version N ...`` line of a version's record (``scores``: its accuracy and loss, if any)."""
    stale = f"{np.mean(rec['staleness']):.1f}" if rec["staleness"] else "-"
    acc = f"accuracy {scores['accuracy']:.3f}  loss {scores['loss']:.3f}" if scores else "accuracy -  loss -"
    return (f"[fedge] version {rec['version']:3d}  {acc}  "
            f"t {t:8.1f}s{'(virtual)' if virtual else ''}  updates {rec['updates']}  "
            f"staleness {stale}  rejected {rejected}  "
            f"uploaded {rec['upload_bytes'] / 1024:.1f} KiB")


def save_final(run_dir: Path, params: dict[str, Any], summary: dict[str, Any]) -> None:
    """The final adapters (``global_adapters.npz``) and the run's counters (``summary.json``)."""
    np.savez(run_dir / "global_adapters.npz", **params)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
