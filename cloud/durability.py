"""The aggregator's durable record: a checkpoint of its whole state and a write-ahead log of the updates since.

Checkpoints are one ``.npz`` file (arrays + a JSON header) written atomically with
:func:`fedge.common.fsio.atomic_write` (a temporary file in the same directory, ``fsync``, ``os.replace``, ``fsync``
of the directory). A checkpoint holds the buffer too. Between checkpoints every accepted update is appended to
the write-ahead log next to it (:data:`WAL_NAME`, one CRC-framed record per update, ``fsync``'d before it counts
as accepted) and the log is emptied by the next checkpoint, so nothing acknowledged is lost to a crash.
:class:`fedge.cloud.state.AggregatorState` decides when to write; this module is the format.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.common.fsio import atomic_write

from .validation import RejectionCounter

if TYPE_CHECKING:
    from .state import AggregatorState

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "WAL_NAME",
    "CheckpointError",
    "append_wal",
    "load_checkpoint",
    "read_checkpoint",
    "read_wal",
    "section",
    "write_checkpoint",
]

CHECKPOINT_NAME = "aggregator.npz"
WAL_NAME = "aggregator.wal"  # accepted updates since the checkpoint: (len, crc32) + JSON line + payload each
_FRAME = struct.Struct("<II")
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match this run."""


def write_checkpoint(st: AggregatorState, d: Path) -> Path:
    """Write the whole state of ``st`` atomically into ``d``, then empty the write-ahead log; return the path."""
    d.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for k, v in st.params.items():
        arrays[f"params/{k}"] = v
    for k, v in st.initial.items():
        arrays[f"initial/{k}"] = v
    for slot, tensors in st.opt_state.items():
        for k, v in tensors.items():
            arrays[f"opt/{slot}/{k}"] = v
    for k, v in (st.base_state or {}).items():
        arrays[f"base/{k}"] = v
    for i, b in enumerate(st.buffer):
        for k, v in b["delta"].items():
            arrays[f"buffer/{i}/{k}"] = v
    for i, dl in enumerate(st.recent_deltas):
        for k, v in dl.items():
            arrays[f"recent/{i}/{k}"] = v
    header = {
        "format": FORMAT, "version": st.version, "oldest_version": st.oldest_version,
        "base_version": st.base_version, "opts": st.opts,
        "buffer": [{k: b[k] for k in ("staleness", "num_examples", "base_version", "norm")}
                   for b in st.buffer],
        "recent_norms": list(st.recent_norms), "recent_claims": list(st.recent_claims),
        "recent_deltas": len(st.recent_deltas), "replays": st.replays.digests(),
        "outliers": st.outliers,
        "rejections": st.rejections.as_dict(), "accepted": st.accepted, "clipped": st.clipped,
        "bytes_accepted": st.bytes_accepted, "history": st.history,
        "opt_slots": sorted(st.opt_state), "has_base": st.base_state is not None,
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    bio = io.BytesIO()
    np.savez(bio, **arrays)  # type: ignore[arg-type]
    atomic_write(d / CHECKPOINT_NAME, bio.getvalue())
    # the checkpoint holds every logged update now; a crash before this truncation replays records that
    # restore() skips by sequence number
    with open(d / WAL_NAME, "wb") as f:
        os.fsync(f.fileno())
    return d / CHECKPOINT_NAME


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and the arrays of the checkpoint in ``checkpoint_dir``; :class:`FileNotFoundError` when there
    is none, :class:`CheckpointError` when it is unreadable or of another format."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no aggregator checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        header = json.loads(bytes(data.pop("__header__")).decode())
    except Exception as e:  # noqa: BLE001 - any parse failure is the same refusal
        raise CheckpointError(f"checkpoint {path} unreadable: {e}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {header.get('format')}")
    return header, data


def section(data: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under ``prefix`` (``"params/"``), keyed by the rest of their name."""
    return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}


def load_checkpoint(st: AggregatorState, header: dict[str, Any], data: dict[str, np.ndarray]) -> None:
    """Put a checkpoint's state into ``st`` (built with the checkpoint's initial adapters and options)."""
    st.params = section(data, "params/")
    st.opt_state = {slot: section(data, f"opt/{slot}/") for slot in header.get("opt_slots", [])}
    st.base_state = section(data, "base/") if header["has_base"] else None
    st.version, st.oldest_version = int(header["version"]), int(header["oldest_version"])
    st.base_version = int(header["base_version"])
    st.buffer = [{"norm": 0.0, **meta, "delta": section(data, f"buffer/{i}/")}
                 for i, meta in enumerate(header["buffer"])]
    st.recent_norms.extend(header.get("recent_norms", []))
    st.recent_claims.extend(header.get("recent_claims", []))
    st.recent_deltas.extend(section(data, f"recent/{i}/") for i in range(int(header.get("recent_deltas", 0))))
    for dg in header.get("replays", []):
        st.replays.add(dg)
    st.outliers = int(header.get("outliers", 0))
    st.rejections = RejectionCounter(dict(header["rejections"]))
    st.accepted, st.clipped = int(header["accepted"]), int(header["clipped"])
    st.bytes_accepted = int(header["bytes_accepted"])
    st.history = list(header["history"])


def append_wal(path: Path, meta: dict[str, Any], payload: bytes) -> None:
    """Append one record (a JSON line of ``meta``, then ``payload``) to the write-ahead log, fsync'd."""
    body = json.dumps(meta).encode() + b"\n" + payload
    with open(path, "ab") as f:
        f.write(_FRAME.pack(len(body), zlib.crc32(body)) + body)
        f.flush()
        os.fsync(f.fileno())


def read_wal(path: str | Path) -> list[tuple[dict[str, Any], bytes]]:
    """The intact records of a write-ahead log, in order; reading stops at a torn or corrupt tail."""
    p = Path(path)
    data = p.read_bytes() if p.is_file() else b""
    out: list[tuple[dict[str, Any], bytes]] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        n, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size: pos + _FRAME.size + n]
        if len(body) < n or zlib.crc32(body) != crc:
            break  # the write the crash interrupted: it was never acknowledged
        head, _, payload = body.partition(b"\n")
        out.append((json.loads(head), payload))
        pos += _FRAME.size + n
    return out
