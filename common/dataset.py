"""Labelled arrays from data a user names: a SampleStore directory or an NPZ, in the layout of common/training.py.

One loader for everything that reads data it did not generate: the server's held-out set
(``data.eval_path``), the cloud's base pretraining (``simulation.pretrain_data``, ``fedge cloud train --data``)
and ``fedge evaluate``. A store is read straight from its SQLite file, read-only, so that the cloud side reads
stores without importing edge code (STYLE.md rule 1); the row format is the one :mod:`fedge.edge.store` writes, and
the decode helpers below are the ones it uses, so both sides turn a stored sample into the same arrays.

The layout: ``image`` (N, 3, S, S) float32 RGB in [0, 1] (zeros where absent), ``audio`` (N, n_mels, frames)
float32 log-mel dB (zeros where absent), ``label`` (N,) int64, ``mask`` (N, 2) bool [image, audio] present,
``quality`` (N, 2) float32 in [0, 1]. The loader keeps labelled samples only; a label outside
``[0, num_classes)`` is an error naming the file and the sample (its source and stream time for a store).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .config import MODALITIES

__all__ = ["ARRAY_KEYS", "DB_NAME", "DataError", "check_store_labels", "decode_image", "describe", "empty_arrays",
           "fill_row", "is_store", "load_data", "validate_arrays"]

ARRAY_KEYS = ("image", "audio", "label", "mask", "quality")
DB_NAME = "samples.db"  # the SampleStore's database file inside its directory


class DataError(ValueError):
    """Data that cannot be used as it is; the message is one line and names the file."""


def empty_arrays(n: int, size: int, n_mels: int, frames: int) -> dict[str, np.ndarray]:
    """Zeroed arrays for ``n`` samples (labels -1: unlabelled)."""
    return {"image": np.zeros((n, 3, size, size), np.float32), "audio": np.zeros((n, n_mels, frames), np.float32),
            "label": np.full(n, -1, np.int64), "mask": np.zeros((n, 2), bool),
            "quality": np.zeros((n, 2), np.float32)}


def decode_image(jpeg: bytes, size: int, *, crop: bool = True) -> np.ndarray:
    """JPEG -> (3, size, size) float32 RGB in [0, 1] (area resize).

    ``crop``: first cut the frame to its salient region (:func:`fedge.common.media.crop.salient_box`: the square
    around the detail, e.g. a card in a room; the whole frame when nothing stands out), so the model's few
    pixels go to the object rather than the scene.

    Raises
    ------
    ValueError
        The bytes are not a decodable image.
    """
    import cv2

    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("a stored keyframe is not a decodable JPEG")
    if crop:
        from .media.crop import crop_salient

        bgr = crop_salient(bgr)
    if bgr.shape[:2] != (size, size):
        bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
    return (bgr[:, :, ::-1].transpose(2, 0, 1) / 255.0).astype(np.float32)


def fill_row(out: dict[str, np.ndarray], i: int, *, image_jpeg: bytes | None, audio: np.ndarray | None,
             label: int | None, quality: tuple[float, float], size: int) -> None:
    """Write one stored sample into row ``i`` of ``out`` (arrays of :func:`empty_arrays`).

    Raises
    ------
    ValueError
        The audio window has another shape than the arrays' (n_mels, frames), or the JPEG does not decode.
    """
    if image_jpeg is not None:
        out["image"][i] = decode_image(image_jpeg, size)
        out["mask"][i, 0] = True
    if audio is not None:
        want = out["audio"].shape[1:]
        if audio.shape != want:
            raise ValueError(f"an audio window has shape {audio.shape}, expected {tuple(want)} "
                             "(model.n_mels, model.audio_frames)")
        out["audio"][i] = audio
        out["mask"][i, 1] = True
    out["label"][i] = -1 if label is None else label
    out["quality"][i] = quality


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a SampleStore directory."""
    return (Path(path) / DB_NAME).is_file()


def describe(path: str | Path) -> str:
    """How a report names the data: ``store DIR`` or ``NPZ FILE`` (absolute)."""
    p = Path(path).resolve()
    return f"store {p}" if is_store(p) else f"NPZ {p}"


def load_data(path: str | Path, *, image_size: int, n_mels: int, frames: int, num_classes: int,
              split: str | None = None, what: str = "data") -> dict[str, np.ndarray]:
    """The labelled samples of a SampleStore directory or an NPZ file.

    Parameters
    ----------
    path : a store directory (holding ``samples.db``) or an ``.npz`` with the keys of :data:`ARRAY_KEYS`.
    image_size, n_mels, frames : the model's input shapes (stored keyframes are resized; audio must match).
    num_classes : labels must lie in ``[0, num_classes)``.
    split : a store's split to read (``train``, ``val``, ``test``); None reads all. An NPZ has no splits.
    what : the name of the setting or option in error messages (``data.eval_path``, ``--data``).

    Raises
    ------
    DataError
        The path is neither, the data does not fit the model, holds no labelled sample, or a label lies
        outside ``[0, num_classes)`` (the message names the file and the sample).
    """
    p = Path(path)
    if is_store(p):
        data = _read_store(p, image_size=image_size, n_mels=n_mels, frames=frames, num_classes=num_classes,
                           split=split, what=what)
    elif p.is_file():
        data = _read_npz(p, what=what)
        validate_arrays(data, image_size=image_size, n_mels=n_mels, frames=frames, num_classes=num_classes,
                        where=f"{what} {p}")
        keep = data["label"] >= 0
        data = {k: v[keep] for k, v in data.items()}
    elif p.is_dir():
        raise DataError(f"{what} {p}: a directory without {DB_NAME}, not a sample store")
    else:
        raise DataError(f"{what} {p}: not found (give a sample store directory or an .npz)")
    if not len(data["label"]):
        raise DataError(f"{what} {p}: holds no labelled sample" + (f" in split {split!r}" if split else ""))
    return data


def validate_arrays(data: Mapping[str, np.ndarray], *, image_size: int, n_mels: int, frames: int,
                    num_classes: int, where: str) -> None:
    """Check arrays against the layout and the model's shapes; labels -1 (unlabelled) or in range.

    Raises
    ------
    DataError
        A key is missing, a shape or length differs, or a label lies outside ``[0, num_classes)``.
    """
    missing = [k for k in ARRAY_KEYS if k not in data]
    if missing:
        raise DataError(f"{where}: lacks the array(s) {', '.join(missing)} (needs {', '.join(ARRAY_KEYS)})")
    n = len(data["label"])
    want = {"image": (n, 3, image_size, image_size), "audio": (n, n_mels, frames), "label": (n,),
            "mask": (n, len(MODALITIES)), "quality": (n, len(MODALITIES))}
    for k, shape in want.items():
        if tuple(data[k].shape) != shape:
            raise DataError(f"{where}: '{k}' has shape {tuple(data[k].shape)}, the model needs {shape} "
                            "(model.image_size, model.n_mels, model.audio_frames)")
    label = np.asarray(data["label"])
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{where}: 'label' must hold integers, not {label.dtype}")
    bad = np.flatnonzero((label < -1) | (label >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: sample {i} has label {int(label[i])}, outside the model's classes "
                        f"0..{num_classes - 1} (model.num_classes = {num_classes}); {len(bad)} such sample(s)")


def _read_npz(p: Path, *, what: str) -> dict[str, np.ndarray]:
    import zipfile

    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{what} {p}: not a readable NPZ ({str(e).splitlines()[0] if str(e) else e!r})") from None


def check_store_labels(path: str | Path, *, num_classes: int, what: str = "store") -> None:
    """Check that every label of a SampleStore lies in ``[0, num_classes)`` without decoding any sample.

    Raises
    ------
    DataError
        A label outside, naming the store, the first such sample (its source and stream time) and the count.
    """
    p = Path(path)
    try:
        conn = sqlite3.connect(f"file:{p / DB_NAME}?mode=ro", uri=True, timeout=30.0)
        try:
            _check_store_labels(conn, p, num_classes=num_classes, cond="", args=(), what=what)
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise DataError(f"{what} {p}: cannot read the sample store ({e})") from None


def _check_store_labels(conn: sqlite3.Connection, p: Path, *, num_classes: int, cond: str, args: tuple[str, ...],
                        what: str) -> None:
    bad = conn.execute(
        "SELECT id, label, source, stream_time, COUNT(*) OVER () FROM samples WHERE label IS NOT NULL AND"
        f" (label < 0 OR label >= ?){cond} ORDER BY id LIMIT 1", (num_classes, *args)).fetchone()
    if bad is not None:
        sid, label, src, st, count = bad
        at = f" ({src or 'unknown source'}" + (f" at {st:.2f} s)" if st is not None else ")")
        raise DataError(f"{what} {p}: sample {sid}{at} has label {label}, outside the model's classes "
                        f"0..{num_classes - 1} (model.num_classes = {num_classes}); {count} such sample(s)")


def _read_store(p: Path, *, image_size: int, n_mels: int, frames: int, num_classes: int, split: str | None,
                what: str) -> dict[str, np.ndarray]:
    cond = "" if split is None else " AND split = ?"
    args: tuple[str, ...] = () if split is None else (split,)
    try:
        # read-only: evaluating or pretraining on a device's store never writes to it (WAL readers are fine)
        conn = sqlite3.connect(f"file:{p / DB_NAME}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as e:
        raise DataError(f"{what} {p}: cannot open the sample store ({e})") from None
    try:
        _check_store_labels(conn, p, num_classes=num_classes, cond=cond, args=args, what=what)
        n = int(conn.execute(f"SELECT COUNT(*) FROM samples WHERE label IS NOT NULL{cond}", args).fetchone()[0])
        out = empty_arrays(n, image_size, n_mels, frames)
        rows = conn.execute("SELECT id, image, audio, n_mels, frames, label, q_image, q_audio FROM samples"
                            f" WHERE label IS NOT NULL{cond} ORDER BY id", args)
        for i, (sid, image, audio, nm, fr, label, qi, qa) in enumerate(rows):
            a = None if audio is None else np.frombuffer(audio, dtype="<f2").reshape(nm, fr).astype(np.float32)
            try:
                fill_row(out, i, image_jpeg=None if image is None else bytes(image), audio=a, label=int(label),
                         quality=(float(qi), float(qa)), size=image_size)
            except ValueError as e:
                raise DataError(f"{what} {p}: sample {sid}: {e}") from None
    except sqlite3.Error as e:
        raise DataError(f"{what} {p}: cannot read the sample store ({e})") from None
    finally:
        conn.close()
    return out
