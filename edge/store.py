"""SampleStore: a device's durable, byte-bounded store of compact multimodal samples (SQLite, WAL mode).

One row per sample: id, device time, modalities, keyframe JPEG, audio log-mel window as float16, optional
label, per-modality quality scores, split. Each write is one SQLite transaction (WAL, ``synchronous=FULL``):
after a crash or ``kill -9`` at any moment a sample is either wholly there or not there at all, and every
sample whose :meth:`SampleStore.put` returned is there. A full disk (SQLITE_FULL) rolls the transaction
back and raises :class:`StoreFullError`: nothing half-written.

The budget bounds the bytes of sample payload (JPEG + audio + a fixed per-row overhead, see
:data:`ROW_OVERHEAD`); a write that would exceed it first evicts the oldest samples (lowest id), in the same
transaction. A sample larger than the whole budget is refused with :class:`StoreBudgetError`.

Training reads it through :meth:`SampleStore.load_arrays` (the in-memory layout of common/training.py) or
:class:`SampleDataset` (a PyTorch ``Dataset`` yielding the same keys per sample).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedge.common.config import MODALITIES
from fedge.common.dataset import DB_NAME, decode_image, empty_arrays, fill_row

__all__ = [
    "DB_NAME",
    "ROW_OVERHEAD",
    "Sample",
    "SampleDataset",
    "SampleStore",
    "StoreBudgetError",
    "StoreError",
    "StoreFullError",
    "budget_from_mb",
    "decode_image",
]

ROW_OVERHEAD = 96  # bytes counted per row on top of its blobs (ids, times, scores, index entries)
SPLITS = ("train", "val", "test")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_time REAL    NOT NULL,             -- seconds since the epoch when the sample was captured
    stream_time REAL,                         -- seconds from the start of its source
    source      TEXT,
    modalities  TEXT    NOT NULL,             -- 'image+audio', 'image' or 'audio'
    image       BLOB,                         -- keyframe JPEG (RGB)
    audio       BLOB,                         -- log-mel dB window, float16 little-endian, (n_mels, frames)
    n_mels      INTEGER,
    frames      INTEGER,
    label       INTEGER,                      -- NULL: unlabeled
    q_image     REAL    NOT NULL DEFAULT 0,
    q_audio     REAL    NOT NULL DEFAULT 0,
    split       TEXT    NOT NULL DEFAULT 'train',
    nbytes      INTEGER NOT NULL,
    CHECK (modalities IN ('image+audio', 'image', 'audio')),
    CHECK ((image IS NOT NULL) = (instr(modalities, 'image') > 0)),
    CHECK ((audio IS NOT NULL) = (instr(modalities, 'audio') > 0))
);
CREATE INDEX IF NOT EXISTS samples_split ON samples(split);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- what the ingest's quality gate removed, by "<modality>:<reason>" (a store made before it gains it empty)
CREATE TABLE IF NOT EXISTS gate_rejections (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
-- the payload total, kept by triggers inside each write's transaction (no scan per write)
INSERT OR IGNORE INTO meta VALUES ('payload_bytes', (SELECT COALESCE(SUM(nbytes), 0) FROM samples));
CREATE TRIGGER IF NOT EXISTS samples_ins AFTER INSERT ON samples BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + NEW.nbytes WHERE key = 'payload_bytes';
END;
CREATE TRIGGER IF NOT EXISTS samples_del AFTER DELETE ON samples BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) - OLD.nbytes WHERE key = 'payload_bytes';
END;
"""


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message is one line."""


class StoreBudgetError(StoreError):
    """The byte budget cannot hold even this one sample."""


class StoreFullError(StoreError):
    """The disk (or the database's page limit) is full: the write was rolled back, nothing half-written."""


@dataclass(frozen=True)
class Sample:
    """One stored sample as read back."""

    id: int
    device_time: float
    modalities: tuple[str, ...]
    image_jpeg: bytes | None
    audio: np.ndarray | None  # (n_mels, frames) float32 dB (stored as float16)
    label: int | None
    quality: tuple[float, float]
    split: str
    stream_time: float | None
    source: str | None


def budget_from_mb(mb: float | None) -> int | None:
    """A budget in bytes from megabytes as an operator types them (``None``: keep the saved budget).

    Raises
    ------
    StoreBudgetError
        Not a finite number > 0, or more bytes than any disk holds.
    """
    if mb is None:
        return None
    if not 0 < mb < 1e12:  # written so that NaN fails too
        raise StoreBudgetError(f"store budget must be a finite number of MB in (0, 1e12), got {mb}")
    return max(1, int(mb * 1e6))


def sample_nbytes(image_jpeg: bytes | None, audio: np.ndarray | None) -> int:
    """Bytes a sample counts against the budget."""
    return ROW_OVERHEAD + (len(image_jpeg) if image_jpeg else 0) + (2 * audio.size if audio is not None else 0)


class SampleStore:
    """A directory holding ``samples.db``.

    Parameters
    ----------
    root : directory (created if missing).
    budget_bytes : payload bytes the store may hold; ``None`` keeps the budget saved in the store (or no
        bound for a new store). A new budget smaller than the content evicts on the next write. A new budget
        is saved with the first sample written under it: one too small for any sample is never kept.
    max_pages : SQLite's ``max_page_count``: a hard size limit for the database file. Hitting it behaves
        exactly like a full disk (SQLITE_FULL), which is how the tests exercise that path.
    """

    def __init__(self, root: str | Path, *, budget_bytes: int | None = None, max_pages: int | None = None) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path is not a directory: {self.root}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent that is a file, a read-only or missing mount
            raise StoreError(f"cannot create the store directory {self.root}: {e.strerror or e}") from None
        self.path = self.root / DB_NAME
        self._max_pages = max_pages
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        conn = self._db()
        if budget_bytes is not None and budget_bytes < 1:
            raise StoreBudgetError(f"store budget must be >= 1 byte, got {budget_bytes}")
        self._unsaved_budget = budget_bytes  # saved in the transaction of the first write under it
        row = conn.execute("SELECT value FROM meta WHERE key = 'budget_bytes'").fetchone()
        self.budget_bytes: int | None = budget_bytes if budget_bytes is not None else int(row[0]) if row else None

    # ------------------------------------------------------------------ connection
    def _db(self) -> sqlite3.Connection:
        """One connection per process (a DataLoader worker opens its own after fork)."""
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before put() returns
                conn.execute("PRAGMA journal_size_limit=4194304")  # truncate the WAL after checkpoints
                if self._max_pages is not None:
                    conn.execute(f"PRAGMA max_page_count={int(self._max_pages)}")
                conn.executescript(_SCHEMA)
            except sqlite3.DatabaseError as e:
                raise StoreError(f"cannot open sample store {self.path}: {e}") from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        """Close the connection (checkpointing the WAL into the main file)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def put(
        self,
        *,
        image_jpeg: bytes | None = None,
        audio: np.ndarray | None = None,
        label: int | None = None,
        quality: Sequence[float] = (1.0, 1.0),
        split: str = "train",
        device_time: float | None = None,
        stream_time: float | None = None,
        source: str | None = None,
    ) -> int:
        """Write one sample atomically (evicting the oldest ones if the budget needs it); returns its id.

        Raises
        ------
        StoreBudgetError
            The sample alone is larger than the budget.
        StoreFullError
            The disk is full: the transaction was rolled back and the store is as it was.
        ValueError
            No modality, a bad split, quality outside [0, 1], non-finite audio.
        """
        return self.put_many([{"image_jpeg": image_jpeg, "audio": audio, "label": label, "quality": quality,
                                   "split": split, "device_time": device_time, "stream_time": stream_time,
                                   "source": source}])[0]

    def put_many(self, samples: Sequence[dict[str, Any]]) -> list[int]:
        """Write several samples in one transaction (all or none); returns their ids."""
        rows = [self._row(**s) for s in samples]
        conn = self._db()
        ids: list[int] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    self._make_room(conn, row["nbytes"])
                    cur = conn.execute(
                        "INSERT INTO samples (device_time, stream_time, source, modalities, image, audio, n_mels,"
                        " frames, label, q_image, q_audio, split, nbytes) VALUES (:device_time, :stream_time,"
                        " :source, :modalities, :image, :audio, :n_mels, :frames, :label, :q_image, :q_audio,"
                        " :split, :nbytes)", row)
                    ids.append(int(cur.lastrowid or 0))
                if self._unsaved_budget is not None:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('budget_bytes', ?)",
                                 (str(int(self._unsaved_budget)),))
                conn.execute("COMMIT")
                self._unsaved_budget = None
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL may already have rolled the whole transaction back
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if "full" in str(e).lower():
                raise StoreFullError(f"disk full while writing to {self.path}: nothing written ({e})") from None
            raise StoreError(f"sample store write failed ({e}): {self.path}") from None
        return ids

    def _row(self, *, image_jpeg: bytes | None = None, audio: np.ndarray | None = None, label: int | None = None,
             quality: Sequence[float] = (1.0, 1.0), split: str = "train", device_time: float | None = None,
             stream_time: float | None = None, source: str | None = None) -> dict[str, Any]:
        mods = [m for m, v in zip(MODALITIES, (image_jpeg, audio)) if v is not None]
        if not mods:
            raise ValueError("a sample needs at least one modality (image or audio)")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        q = [float(x) for x in quality]
        if len(q) != 2 or not all(0.0 <= x <= 1.0 for x in q):
            raise ValueError(f"quality must be two scores in [0, 1], got {quality!r}")
        a16 = None
        if audio is not None:
            a = np.asarray(audio, dtype=np.float32)
            if a.ndim != 2 or not np.isfinite(a).all():
                raise ValueError("audio must be a finite (n_mels, frames) array")
            a16 = a.astype("<f2")
        nbytes = sample_nbytes(image_jpeg, a16)
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise StoreBudgetError(
                f"store budget {self.budget_bytes} bytes is too small for one sample ({nbytes} bytes)")
        return {
            "device_time": time.time() if device_time is None else float(device_time),
            "stream_time": stream_time,
            "source": source,
            "modalities": "+".join(mods),
            "image": sqlite3.Binary(image_jpeg) if image_jpeg is not None else None,
            "audio": sqlite3.Binary(a16.tobytes()) if a16 is not None else None,
            "n_mels": int(a16.shape[0]) if a16 is not None else None,
            "frames": int(a16.shape[1]) if a16 is not None else None,
            "label": None if label is None else int(label),
            "q_image": q[0],
            "q_audio": q[1],
            "split": split,
            "nbytes": nbytes,
        }

    def add_rejections(self, counts: Mapping[str, int]) -> None:
        """Add the quality gate's removals (``"<modality>:<reason>"`` -> count) to the store's totals."""
        rows = [(str(k), int(v)) for k, v in counts.items() if int(v) > 0]
        if not rows:
            return
        conn = self._db()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO gate_rejections VALUES (?, ?) ON CONFLICT(reason) DO UPDATE SET"
                                 " count = count + excluded.count", rows)
        except sqlite3.OperationalError as e:
            raise StoreError(f"sample store write failed ({e}): {self.path}") from None

    def _make_room(self, conn: sqlite3.Connection, need: int) -> None:
        if self.budget_bytes is None:
            return
        used = int(conn.execute("SELECT value FROM meta WHERE key = 'payload_bytes'").fetchone()[0])
        excess = used + need - self.budget_bytes
        if excess <= 0:
            return
        # oldest first: walk ids upwards until enough bytes are freed
        freed, last = 0, None
        for sid, nb in conn.execute("SELECT id, nbytes FROM samples ORDER BY id"):
            freed += nb
            last = sid
            if freed >= excess:
                break
        if last is not None:
            gone = conn.execute("DELETE FROM samples WHERE id <= ?", (last,)).rowcount
            conn.execute("INSERT INTO meta VALUES ('evicted', ?) ON CONFLICT(key) DO UPDATE SET value ="
                         " CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER)", (str(gone),))

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        """What the store holds: samples, bytes, budget, evictions, and samples by modality set, split and label
        (``"unlabeled"`` for none), per split by label and modality set, the quality gate's removals by reason,
        and the capture time span (device time, epoch seconds; None when empty)."""
        conn = self._db()
        n, used, t0, t1 = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0), MIN(device_time), MAX(device_time) FROM samples").fetchone()
        kept = int(conn.execute("SELECT value FROM meta WHERE key = 'payload_bytes'").fetchone()[0])
        if kept != used:  # cannot happen while the triggers run in every write's transaction
            raise StoreError(f"payload total out of step ({kept} != {used}): {self.path}")
        mods = dict(conn.execute("SELECT modalities, COUNT(*) FROM samples GROUP BY modalities").fetchall())
        splits = dict(conn.execute("SELECT split, COUNT(*) FROM samples GROUP BY split").fetchall())
        labels = {("unlabeled" if label is None else str(label)): c for label, c in conn.execute(
            "SELECT label, COUNT(*) FROM samples GROUP BY label ORDER BY label IS NULL, label")}
        by_split: dict[str, dict[str, dict[str, int]]] = {}
        for split, label, m, c in conn.execute(
                "SELECT split, label, modalities, COUNT(*) FROM samples GROUP BY split, label, modalities"
                " ORDER BY split, label IS NULL, label, modalities"):
            name = "unlabeled" if label is None else str(label)
            per = by_split.setdefault(split, {"labels": {}, "modalities": {}})
            per["labels"][name] = per["labels"].get(name, 0) + c
            per["modalities"][m] = per["modalities"].get(m, 0) + c
        rejected = dict(conn.execute("SELECT reason, count FROM gate_rejections ORDER BY reason").fetchall())
        ev = conn.execute("SELECT value FROM meta WHERE key = 'evicted'").fetchone()
        files = sum(p.stat().st_size for p in self.root.glob(DB_NAME + "*") if p.is_file())
        return {"samples": int(n), "payload_bytes": int(used), "file_bytes": int(files),
                "budget_bytes": self.budget_bytes, "evicted": int(ev[0]) if ev else 0, "modalities": mods,
                "splits": splits, "labels": labels, "by_split": by_split, "rejected": rejected,
                "time_span": None if t0 is None else {"first": float(t0), "last": float(t1),
                                                      "seconds": float(t1) - float(t0)}}

    def ids(self, split: str | None = None) -> list[int]:
        """Ids in insertion order, optionally of one split."""
        q = "SELECT id FROM samples" + (" WHERE split = ?" if split else "") + " ORDER BY id"
        return [r[0] for r in self._db().execute(q, (split,) if split else ())]

    def get(self, sample_id: int) -> Sample:
        """One sample by id (KeyError if it is not there, e.g. evicted)."""
        row = self._db().execute(
            "SELECT id, device_time, modalities, image, audio, n_mels, frames, label, q_image, q_audio, split,"
            " stream_time, source FROM samples WHERE id = ?", (int(sample_id),)).fetchone()
        if row is None:
            raise KeyError(f"no sample {sample_id} in {self.path}")
        return _sample(row)

    def iter_samples(self, split: str | None = None) -> Iterator[Sample]:
        """All samples in insertion order (one row in memory at a time)."""
        q = ("SELECT id, device_time, modalities, image, audio, n_mels, frames, label, q_image, q_audio, split,"
             " stream_time, source FROM samples" + (" WHERE split = ?" if split else "") + " ORDER BY id")
        for row in self._db().execute(q, (split,) if split else ()):
            yield _sample(row)

    def load_arrays(self, *, image_size: int = 32, n_mels: int = 40, frames: int = 32,
                    split: str | None = None) -> dict[str, np.ndarray]:
        """All samples (of ``split``) in the training layout of common/training.py.

        Returns
        -------
        dict with ``image`` (N, 3, S, S) float32 RGB in [0, 1] (zeros where absent), ``audio`` (N, n_mels,
        frames) float32 log-mel dB (zeros where absent), ``label`` (N,) int64 (-1 if unlabeled), ``mask``
        (N, 2) bool [image, audio] present, ``quality`` (N, 2) float32 in [0, 1].

        Raises
        ------
        StoreError
            A stored audio window has another shape than (n_mels, frames).
        """
        ids = self.ids(split)
        out = empty_arrays(len(ids), image_size, n_mels, frames)
        for i, s in enumerate(self.iter_samples(split)):
            _fill(out, i, s, image_size)
        return out


def _sample(row: tuple) -> Sample:
    sid, dt, mods, image, audio, nm, fr, label, qi, qa, split, st, src = row
    a = None
    if audio is not None:
        a = np.frombuffer(audio, dtype="<f2").reshape(nm, fr).astype(np.float32)
    return Sample(int(sid), float(dt), tuple(mods.split("+")), bytes(image) if image is not None else None, a,
                  None if label is None else int(label), (float(qi), float(qa)), split, st, src)


def _fill(out: dict[str, np.ndarray], i: int, s: Sample, size: int) -> None:
    try:
        fill_row(out, i, image_jpeg=s.image_jpeg, audio=s.audio, label=s.label, quality=s.quality, size=size)
    except ValueError as e:
        raise StoreError(f"sample {s.id}: {e}") from None


class SampleDataset:
    """PyTorch ``Dataset`` over a store: item ``i`` is a dict of tensors with the keys of
    :meth:`SampleStore.load_arrays` (``image`` (3, S, S), ``audio`` (n_mels, frames), ``label``, ``mask`` (2,),
    ``quality`` (2,)). The ids are fixed when the dataset is made; each DataLoader worker opens its own
    connection. A sample evicted since then raises ``KeyError``.
    """

    def __init__(self, store: SampleStore, *, image_size: int = 32, n_mels: int = 40, frames: int = 32,
                 split: str | None = None, labeled_only: bool = False) -> None:
        self.store = store
        self.size, self.n_mels, self.frames = image_size, n_mels, frames
        ids = store.ids(split)
        if labeled_only:
            keep = {r[0] for r in store._db().execute("SELECT id FROM samples WHERE label IS NOT NULL")}
            ids = [i for i in ids if i in keep]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        out = empty_arrays(1, self.size, self.n_mels, self.frames)
        _fill(out, 0, self.store.get(self.ids[i]), self.size)
        return {k: torch.as_tensor(v[0]) for k, v in out.items()}
