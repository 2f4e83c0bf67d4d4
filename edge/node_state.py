"""What a device keeps on disk between rounds and restarts: error-feedback residual, adapters, privacy ledger.

Flower keeps ``Context.state`` in the SuperNode's memory, which a restart (SIGTERM, crash, reboot) loses;
these files, in the node's state directory (``<store>/agent-state`` by default), survive it. Every write is
atomic (:mod:`fedge.common.fsio`), so a device stopped at any instant finds either the previous or the new state,
never half of one; the update ledger is appended with :func:`fedge.common.fsio.append_jsonl`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.fsio import append_jsonl, atomic_write, read_jsonl

__all__ = ["ADAPTERS_FILE", "PRIVACY_FILE", "RESIDUAL_FILE", "UPDATES_FILE", "append_jsonl", "load_arrays",
           "load_json", "read_jsonl", "save_arrays", "save_json"]

RESIDUAL_FILE = "residual.npz"  # error-feedback residual of the codec
ADAPTERS_FILE = "adapters.npz"  # the adapters after the latest local training (+ their base version)
PRIVACY_FILE = "privacy.json"  # releases so far (the DP accountant's ledger)
UPDATES_FILE = "updates.jsonl"  # one line of metrics per update sent (size accounting)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
    """Write name -> array (and a small JSON ``meta``) to ``path`` atomically as .npz."""
    buf = io.BytesIO()
    payload = {f"a/{k}": np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["meta"] = np.frombuffer(json.dumps(meta or {}).encode(), dtype=np.uint8)
    np.savez(buf, **payload)  # type: ignore[arg-type]
    atomic_write(path, buf.getvalue())


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read what :func:`save_arrays` wrote; None when the file is absent.

    Raises ValueError (naming the file) when it exists but is unreadable.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k[2:]: np.array(z[k]) for k in z.files if k.startswith("a/")}
            meta = json.loads(bytes(z["meta"]).decode()) if "meta" in z.files else {}
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same refusal
        raise ValueError(f"node state file {path} is unreadable: {e}") from None
    return arrays, meta


def save_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a JSON object atomically."""
    atomic_write(path, json.dumps(obj, sort_keys=True))


def load_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON object; None when absent; ValueError naming the file when unreadable."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"node state file {path} is unreadable: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"node state file {path} is not a JSON object")  # noqa: TRY004 - a bad file, not a bad call
    return obj
