"""Where an ingest of a recorded file got to, kept in its SampleStore, so that a restarted ingest resumes there.

A recording is known by what it is, not only by its name: its resolved path, size and modification time
(:func:`source_key`; the audio file too when it is another file). The store keeps, per key, the stream time of
the last sample committed from it, in a table that a trigger updates inside the very transaction that inserts
the sample (:func:`track`): after a crash or ``kill -9`` at any moment the recorded point and the stored samples
agree. A restarted ingest decodes from the start and stores only samples past that point (decode-and-skip: every
decoder can do it, and the keyframe detector and the audio windows see the same stream as the first time, so
they choose the same samples), hence never stores the same span twice. A file that changed (size or time) is a
new recording and is ingested from its start. Live sources (a camera index, a URL, a device) have no key.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from fedge.edge.store import SampleStore, StoreError

__all__ = ["resume_point", "source_key", "stored_keys", "track", "track_many"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_progress (
    key         TEXT PRIMARY KEY,  -- source_key() of the recording
    source      TEXT NOT NULL,     -- the samples' `source` while this recording is being ingested
    stream_time REAL NOT NULL,     -- stream time of its last committed sample (-inf: none yet)
    active      INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS ingest_progress_ins AFTER INSERT ON samples
WHEN NEW.stream_time IS NOT NULL BEGIN
    UPDATE ingest_progress SET stream_time = max(stream_time, NEW.stream_time)
    WHERE active = 1 AND source = NEW.source;
END;
"""


def _file_id(src: str | os.PathLike[str]) -> str | None:
    p = Path(src)
    try:
        if not p.is_file():
            return None
        st = p.stat()
    except OSError:
        return None
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def source_key(video: str | os.PathLike[str] | int | None, audio: str | os.PathLike[str] | None) -> str | None:
    """The identity of a recording (path + size + mtime of each file given), or None for a live source."""
    parts = []
    for src in (video, audio):
        if src is None:
            continue
        if isinstance(src, int):
            return None
        fid = _file_id(src)
        if fid is None:
            return None
        parts.append(fid)
    return " + ".join(parts) or None


def track(store: SampleStore, key: str, source: str) -> None:
    """From now on, every sample stored with ``source`` advances the progress of ``key`` (in its transaction)."""
    track_many(store, [(key, source)])


def track_many(store: SampleStore, pairs: list[tuple[str, str]]) -> None:
    """:func:`track` for many ``(key, source)`` pairs in one transaction (a folder of photos, each a recording
    with its own source)."""
    conn = store._db()
    try:
        conn.executescript(_SCHEMA)
        # the store's connection autocommits (isolation_level=None): `with conn` would not open a transaction
        conn.execute("BEGIN IMMEDIATE")
        try:
            for key, source in pairs:
                conn.execute("INSERT OR IGNORE INTO ingest_progress (key, source, stream_time) VALUES (?, ?, ?)",
                             (key, source, -math.inf))
                conn.execute("UPDATE ingest_progress SET source = ?, active = (key = ?) WHERE source = ? OR key = ?",
                             (source, key, source, key))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except Exception as e:  # noqa: BLE001 - sqlite3 errors of a store that cannot be written
        raise StoreError(f"cannot record ingest progress in {store.path}: {e}") from None


def stored_keys(store: SampleStore, keys: list[str]) -> set[str]:
    """Those of ``keys`` from which a sample was stored (one query for a whole folder of photos)."""
    conn = store._db()
    conn.executescript(_SCHEMA)
    done = {k for (k,) in conn.execute("SELECT key FROM ingest_progress WHERE stream_time > ?", (-math.inf,))}
    return done.intersection(keys)


def resume_point(store: SampleStore, key: str) -> float | None:
    """Stream time of the last sample stored from the recording ``key``; None when none was."""
    conn = store._db()
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT stream_time FROM ingest_progress WHERE key = ?", (key,)).fetchone()
    return None if row is None or not math.isfinite(row[0]) else float(row[0])
