"""A shared sample pool: its columns as ``.npy`` files and the rows each simulated device draws from it.

A large simulation renders and ingests one pool of samples instead of every device's own streams
(``simulation.pool_samples``); the simulation writes the pool and the assignment here, and a device reads its
rows only when it trains (``data.source = "pool"``). Both files are memory-mapped, so an idle device holds
nothing but its partition id, and a training device holds only its own rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import ARRAY_KEYS

__all__ = ["ASSIGNMENT", "column_path", "device_arrays", "device_rows", "write_columns"]

ASSIGNMENT = "assignment.npy"  # (devices, samples_per_device) int32 pool rows per device, -1 = none


def column_path(root: str | Path, key: str) -> Path:
    """The ``.npy`` file of column ``key`` (one of :data:`fedge.common.dataset.ARRAY_KEYS`) of the pool at ``root``."""
    return Path(root) / f"{key}.npy"


def write_columns(root: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Save the pool's columns (``image``, ``audio``, ``label``, ``mask``, ``quality``; equal first axes)."""
    n = {len(arrays[k]) for k in ARRAY_KEYS}
    if len(n) != 1:
        raise ValueError(f"pool columns differ in length: {sorted(n)}")
    Path(root).mkdir(parents=True, exist_ok=True)
    for k in ARRAY_KEYS:
        np.save(column_path(root, k), np.ascontiguousarray(arrays[k]))


def device_rows(root: str | Path, device: int) -> np.ndarray:
    """The pool rows device ``device`` trains on (sorted, no -1), read from the memory-mapped assignment."""
    table = np.load(Path(root) / ASSIGNMENT, mmap_mode="r")
    if not 0 <= device < table.shape[0]:
        raise ValueError(f"device {device} not in the pool's assignment (devices 0..{table.shape[0] - 1})")
    rows = np.asarray(table[device])
    return np.sort(rows[rows >= 0])


def device_arrays(root: str | Path, device: int) -> dict[str, np.ndarray]:
    """The arrays of device ``device``: only its rows are read from the memory-mapped columns (in-memory copies).

    Raises
    ------
    FileNotFoundError
        ``root`` holds no pool (no assignment or a column is missing).
    """
    rows = device_rows(root, device)
    return {k: np.asarray(np.load(column_path(root, k), mmap_mode="r")[rows]) for k in ARRAY_KEYS}
